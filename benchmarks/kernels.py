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


def chain_model(fmt: str, k: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """x [M, k] float32 -> `layers` matmuls by [k, k] weights in `fmt` -> y [M, k]. One random matrix, stored
    once per layer (separate buffers, so M = 1 streams them all), scaled so |x| stays ~1 along the chain: no
    overflow and no denormals, which would time something else."""
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
        inits += [numpy_helper.from_array(a, n) for a, n in zip(data, names)]
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
    graph = helper.make_graph(nodes, f"{fmt}_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", k])], initializer=inits)
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
    """ops/s at M = prefill_m (4 weights) and weight bytes/s at M = 1 (weights of `stream_mb` MB in `fmt`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3

    def session(layers: int) -> ort.InferenceSession:
        return ort.InferenceSession(chain_model(fmt, k, layers).SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(1)
    compute = session(4)
    seconds = _best(compute, rng.standard_normal((prefill_m, k), dtype=np.float32), repeats)
    ops_per_s = 2.0 * prefill_m * k * k * 4 / seconds
    del compute
    layers = max(1, round(stream_mb * 2**20 / (k * k * BYTES_PER_WEIGHT[fmt])))
    stream = session(layers)
    seconds_m1 = _best(stream, rng.standard_normal((1, k), dtype=np.float32), repeats)
    weight_bytes = layers * k * k * BYTES_PER_WEIGHT[fmt]
    return {"ops_per_s": ops_per_s, "prefill_m": prefill_m, "weight_bytes_per_s_m1": weight_bytes / seconds_m1,
            "m1_ms_per_weight": 1e3 * seconds_m1 / layers, "stream_layers": layers, "k": k}
