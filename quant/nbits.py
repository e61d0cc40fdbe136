"""INT4 weight-only quantization (MatMulNBits), one weight at a time, at any model size.

ONNX Runtime's `MatMulNBitsQuantizer` loads the whole graph with its data and keeps its copies (3.8 GB
peak for a 2.1 GB decoder; a 7B graph would not fit a 16 GB laptop). This module makes the same graph
while holding one weight: it walks the graph structure (loaded without external data), reads each
MatMul's constant weight from the external-data file through a memory map, quantizes it with ONNX
Runtime's own block quantizer (`DefaultWeightOnlyQuantizer.qbits_block_quant`, which calls the C++
kernel `quantize_matmul_4bits`), and streams the packed blocks and scales into the variant's own
external data. Names, attributes and layout follow ORT's quantizer, so a small graph comes out equal
to what `MatMulNBitsQuantizer` writes (tests/quant/test_nbits.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vtprune.export.graph_order import outer_reads
from vtprune.export.streaming import DataWriter, TensorReader

MS_DOMAIN = "com.microsoft"
_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def quantize_int4(src: Path, stage: Path, name: str, block_size: int, exclude: list[str], accuracy_level: int = 4,
                  progress=None) -> onnx.ModelProto:
    """src graph -> the MatMulNBits graph, its weights in stage/<name>.data when src keeps its own external.

    Every MatMul whose second input is a 2-D float initializer, and every Gemm that is such a MatMul on a weight
    stored [N, K] (the LM head: a fifth of a 1B model's decode step read in fp32 otherwise), except the
    `exclude`d nodes, becomes MatMulNBits (symmetric, `block_size`, scales in the weight's dtype: fp16 for an
    fp16 graph).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    proto = onnx.load(str(src), load_external_data=False)
    read = TensorReader(Path(src).parent)
    inits = {t.name: t for t in proto.graph.initializer}
    external = any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    writer = DataWriter(stage, name + ".data") if external else None
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level))
    skip = set(exclude)
    nodes, new_inits = [], []
    try:
        for node in proto.graph.node:
            found = weight_of(node, inits, tuple(_FLOAT)) if node.name not in skip else None
            if found is None:
                nodes.append(node)
                continue
            weight, transposed = found
            w = np.asarray(read(weight))
            w = np.ascontiguousarray(w.T) if transposed else w  # [K, N], C order: the kernel reads raw memory
            K, N = w.shape
            packed, scales, _ = quantizer.qbits_block_quant(w.astype(np.float32))  # [N, blocks, blob], [N, blocks]
            del w
            scales = scales.astype(_FLOAT[weight.data_type])
            q_name, s_name = weight.name + "_Q4", weight.name + "_scales"
            for tname, array in ((q_name, packed), (s_name, scales)):
                new_inits.append(writer.tensor_proto(tname, array) if writer else numpy_helper.from_array(array, tname))
            attrs = dict(K=K, N=N, bits=4, block_size=block_size)
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                          name=node.name + "_Q4" if node.name else "", domain=MS_DOMAIN, **attrs))
            if progress is not None:
                progress.update(1)
        replace_graph(proto, nodes, new_inits, read, writer)
    finally:
        if writer is not None:
            writer.close()
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return proto


def weight_of(node, inits, dtypes: tuple[int, ...]) -> tuple[onnx.TensorProto, bool] | None:
    """The constant 2-D weight (of a type in `dtypes`) of a MatMul, or of a Gemm that is one (transB, no bias,
    alpha 1); with whether it is stored [N, K] (Gemm transB) rather than [K, N]."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        transposed = False
    elif node.op_type == "Gemm" and len(node.input) == 2:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0):
            return None
        transposed = True
    else:
        return None
    w = inits.get(node.input[1])
    return (w, transposed) if w is not None and len(w.dims) == 2 and w.data_type in dtypes else None


def replace_graph(proto: onnx.ModelProto, nodes: list, new_inits: list, read: TensorReader, writer: DataWriter | None) -> None:
    """In place: the graph's nodes become `nodes`; its initializers the ones still read (norms, small constants,
    excluded weights; external ones copied into `writer`'s file) plus `new_inits`. Shared by the streaming
    quantizers (int4 here, int8 in quant/int8_stream.py)."""
    used = {i for n in nodes for i in outer_reads(n)} | {o.name for o in proto.graph.output}  # If branches' reads too
    used |= {i for f in proto.functions for n in f.node for i in outer_reads(n)}
    kept = [writer.tensor_proto(t.name, np.asarray(read(t))) if writer is not None and t.data_location == TensorProto.EXTERNAL
            else t for t in proto.graph.initializer if t.name in used]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + new_inits)
