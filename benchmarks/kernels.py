"""ONNX Runtime's matmul kernels per weight format, timed where the runtime's graphs use them: the CPU roof.

Each format is a chain of [K, K] weights in the form the bundle's graphs carry it:
  fp32  MatMul
  int8  DynamicQuantizeLinear + MatMulInteger (per-channel int8 weights) + the two rescaling Muls, what
        `onnxruntime.quantization.quantize_dynamic` writes (ORT fuses it into DynamicQuantizeMatMul)
  int4  com.microsoft MatMulNBits, symmetric, `vtprune quantize`'s default block (128), accuracy_level 4
        (quant/nbits.py's recipe)
The weights are random bytes in those formats (a kernel's speed does not depend on the values), so a
gigabyte of int4 weights costs a second to make, not a quantization of 8 GB of fp32.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vtprune.quant import INT4_BLOCK as BLOCK  # (what `vtprune quantize --precision int4` makes)
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4.0 / BLOCK}  # int4: packed nibbles + one fp32 scale per block


def chain_model(fmt: str, k: int, layers: int, m: int | str = "M", seed: int = 0) -> onnx.ModelProto:
    """x [m, k] float32 -> `layers` matmuls by [k, k] weights in `fmt` -> y [m, k]. The roof fixes m at the pass's
    size (with a symbolic m, fp32's M = 1 chain streamed 21.7 GB/s here against 23.7 fixed: below the rate the
    fp32 decoder's own matmuls reach, so a measured decode sat above its roof). One random matrix, its
    rows rotated differently in each layer: every layer's bytes differ, so M = 1 streams them all from memory
    (with the same bytes in each layer ONNX Runtime reads one copy: the first CPU roof's int4 and int8
    "bandwidth" was 46-48 GB/s, twice a memory copy's). Scaled so |x| stays ~1 along the chain: no overflow
    and no denormals, which would time something else."""
    rng = np.random.default_rng(seed)
    blocks = k // BLOCK
    if fmt == "fp32":
        data = [rng.standard_normal((k, k), dtype=np.float32) * np.float32(k**-0.5)]
    elif fmt == "int8":  # per-channel symmetric int8 in the 7-bit range int8 bundles use (quant/int8_stream.REDUCE_RANGE)
        data = [rng.integers(-63, 64, (k, k), dtype=np.int8), np.zeros(k, np.int8), np.full(k, 1 / (36.7 * np.sqrt(k)), np.float32)]
    elif fmt == "int4":  # nibbles 1..15 (values -7..7 around the zero point 8, mean 0): [N, blocks, BLOCK / 2] packed
        lo, hi = (rng.integers(1, 16, (k, blocks, BLOCK // 2), dtype=np.uint8) for _ in range(2))
        data = [lo | (hi << 4), np.full((k, blocks), 1 / (4.32 * np.sqrt(k)), np.float32)]
    else:
        raise ValueError(f"unknown weight format {fmt!r}; expected fp32, int8 or int4")
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        y = f"y{i}"
        names = [f"w{i}", f"w{i}_zp", f"w{i}_scale"] if fmt == "int8" else [f"w{i}", f"w{i}_scale"][: len(data)]
        inits += [numpy_helper.from_array(np.roll(a, i, axis=0) if a.ndim > 1 else a, n) for a, n in zip(data, names)]
        if fmt == "fp32":
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        elif fmt == "int8":
            nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"q{i}", f"qs{i}", f"qz{i}"]),
                      helper.make_node("MatMulInteger", [f"q{i}", f"w{i}", f"qz{i}", f"w{i}_zp"], [f"acc{i}"]),
                      helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"qs{i}", f"w{i}_scale"], [f"s{i}"]),
                      helper.make_node("Mul", [f"accf{i}", f"s{i}"], [y])]
        else:
            nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"w{i}_scale"], [y], domain="com.microsoft",
                                          K=k, N=k, bits=4, block_size=BLOCK, accuracy_level=4))
        x = y
    graph = helper.make_graph(nodes, f"{fmt}_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [m, k])], initializer=inits)
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid("com.microsoft", 1)] if fmt == "int4" else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _best(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    session.run(None, {"x": x})  # warm-up: thread pool, packing, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return best


def chain_rates(fmt: str, k: int = 4096, prefill_m: int = 256, stream_mb: int = 1024, repeats: int = 3,
                threads: int = 0) -> dict:
    """ops/s at M = prefill_m (4 [k, k] weights, best of `repeats`) and weight bytes/s at M = 1: `stream_mb` MB of
    weights in `fmt`, as [k, k] and as [k/2, k/2] matrices (a decoder holds both sizes; fp32 streams the narrower
    faster here, int8 and int4 the wider), the best of 20 passes of either. One pass costs a few tens of ms, and
    its rate varied by up to 30% between passes and processes on this shared VM: the roof is the best seen."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3

    def session(width: int, layers: int, m: int) -> ort.InferenceSession:
        return ort.InferenceSession(chain_model(fmt, width, layers, m).SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(1)
    compute = session(k, 4, prefill_m)
    seconds = _best(compute, rng.standard_normal((prefill_m, k), dtype=np.float32), repeats)
    ops_per_s = 2.0 * prefill_m * k * k * 4 / seconds
    del compute
    streams = []
    for width in (k, max(BLOCK, k // 2)):
        layers = max(1, round(stream_mb * 2**20 / (width * width * BYTES_PER_WEIGHT[fmt])))
        stream = session(width, layers, 1)
        seconds_m1 = _best(stream, rng.standard_normal((1, width), dtype=np.float32), max(repeats, 20))
        del stream
        weight_bytes = layers * width * width * BYTES_PER_WEIGHT[fmt]
        streams.append({"weight_bytes_per_s_m1": weight_bytes / seconds_m1, "m1_ms_per_weight": 1e3 * seconds_m1 / layers,
                        "stream_layers": layers, "stream_k": width})
    return {"ops_per_s": ops_per_s, "prefill_m": prefill_m, "k": k, **max(streams, key=lambda r: r["weight_bytes_per_s_m1"])}
