"""Dynamic INT8 (MatMulInteger), one weight at a time, at any model size.

ONNX Runtime's `quantize_dynamic` loads the whole graph with its data and keeps its copies (8.4 GB peak for a
2.1 GB decoder: a 7B graph's 26 GB would need about 100 GB). This module writes the graph `quantize_dynamic`
writes (per-channel symmetric int8 weights, `MatMulConstBOnly`) while holding one weight: it walks the structure
(loaded without external data), reads each constant weight through a memory map, quantizes each output channel
with ONNX Runtime's own `quant_utils.quantize_data` (what its per-channel weight quantizer calls, channel by
channel), and streams the int8 weights into the variant's own external data. The nodes and their names follow
ORT's dynamic quantizer: one DynamicQuantizeLinear per activation, then per MatMul the scales' Mul, MatMulInteger,
Cast and the output Mul; a Gemm with transB and no bias (an LM head) becomes that MatMul on the transposed weight,
as ORT's quantizer does. tests/quant/test_int8_stream.py holds it equal to `quantize_dynamic` on a small graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vtprune.export.streaming import DataWriter, TensorReader
from vtprune.quant.nbits import replace_graph, weight_of


# Weights in 7 bits (-64..64). ORT's u8s8 integer GEMM on x86 CPUs without VNNI (AVX2, AVX-512F: AMD Zen 3,
# Intel before Cascade Lake) sums pairs of uint8 x int8 products in int16 (vpmaddubsw), which saturates at full
# 8-bit range: on a Zen 3 the tiny test model's int8 logits were 35% off (max relative difference; within the test's 3% at 7 bits),
# while the same bundle was right on an AVX512-VNNI Xeon. A bundle runs on machines it was not made on, so every
# int8 variant takes the range that is right everywhere (ORT's own advice for these CPUs), at ~1 bit of weight precision.
REDUCE_RANGE = True


def _per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [K, N] float32 -> (int8 [K, N], scale [N] float32, zero point [N] int8), column by column."""
    from onnxruntime.quantization.quant_utils import quantize_data

    q = np.empty(w.shape, np.int8)
    scales = np.empty(w.shape[1], np.float32)
    zps = np.empty(w.shape[1], np.int8)
    for n in range(w.shape[1]):
        zp, scale, qn = quantize_data(w[:, n], TensorProto.INT8, symmetric=True, reduce_range=REDUCE_RANGE)
        q[:, n], scales[n], zps[n] = qn, scale, zp
    return q, scales, zps


def quantize_int8(src: Path, stage: Path, name: str, exclude: list[str], progress=None) -> onnx.ModelProto:
    """src graph -> its dynamic-int8 graph, the int8 weights in stage/<name>.data when src keeps its own external."""
    proto = onnx.load(str(src), load_external_data=False)
    read = TensorReader(Path(src).parent)
    inits = {t.name: t for t in proto.graph.initializer}
    external = any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    writer = DataWriter(stage, name + ".data") if external else None
    skip = set(exclude)
    nodes, new_inits, quantized_inputs = [], [], {}

    def add(array, tname):
        new_inits.append(writer.tensor_proto(tname, array) if writer else numpy_helper.from_array(array, tname))

    try:
        for node in proto.graph.node:
            found = weight_of(node, inits, (TensorProto.FLOAT,)) if node.name not in skip else None
            if found is None:
                nodes.append(node)
                continue
            weight, transposed = found
            w = np.asarray(read(weight))
            w = np.ascontiguousarray(w.T) if transposed else w  # [K, N]
            q, scale, zp = _per_channel(w.astype(np.float32, copy=False))
            del w
            wname = weight.name + ("_Transposed" if transposed else "")
            add(q, wname + "_quantized")
            add(scale, wname + "_scale")
            add(zp, wname + "_zero_point")
            x, out = node.input[0], node.output[0]
            base = node.name + ("_MatMul" if node.op_type == "Gemm" else "")
            if x not in quantized_inputs:  # one DynamicQuantizeLinear per activation, shared by its MatMuls
                quantized_inputs[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]), name=f"{x}_QuantizeLinear"))
            xq, xs, xz = quantized_inputs[x]
            nodes += [
                helper.make_node("Mul", [xs, wname + "_scale"], [f"{base}_quant_scales_mul:0"], name=f"{base}_quant_scales_mul"),
                helper.make_node("MatMulInteger", [xq, wname + "_quantized", xz, wname + "_zero_point"],
                                 [f"{out}_output_quantized"], name=f"{base}_quant"),
                helper.make_node("Cast", [f"{out}_output_quantized"], [f"{out}_output_quantized_cast_output"],
                                 name=f"{out}_output_quantized_cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{out}_output_quantized_cast_output", f"{base}_quant_scales_mul:0"], [out],
                                 name=f"{base}_quant_output_scale_mul"),
            ]
            if progress is not None:
                progress.update(1)
        replace_graph(proto, nodes, new_inits, read, writer)
    finally:
        if writer is not None:
            writer.close()
    return proto
