"""Streaming INT4 (quant/nbits.py) makes what ONNX Runtime's MatMulNBitsQuantizer makes, one weight at a time;
and the LM head's Gemm, which ORT's quantizer leaves in fp32, as it makes the same head written as a MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from vtprune.quant.nbits import quantize_int4
from vtprune.quant.quantize import activation_matmuls, score_path_nodes
from vtprune.runtime.bundle import Bundle


def _ort_quantized(src, block_size, exclude):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(str(src), bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4,
                             nodes_to_exclude=exclude)
    q.process()
    return q.model.model


def _gemm_as_matmul(src, out):
    """src with every Gemm(transB) on a weight rewritten as the MatMul on the transposed weight, same names."""
    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm" and n.input[1] in inits]
    for node in gemms:
        w = inits[node.input[1]]
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        node.op_type = "MatMul"
        del node.attribute[:]
    onnx.save(proto, str(out))
    return out, len(gemms)


def _nodes(proto):
    return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output),
                   tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                                if a.type == onnx.AttributeProto.INT))) for n in proto.graph.node)


def _exclude(src):
    structure = onnx.load(str(src), load_external_data=False)
    return list(dict.fromkeys(score_path_nodes(structure) + activation_matmuls(structure)))


@pytest.mark.parametrize("graph", ["decoder", "vision"])
@pytest.mark.parametrize("block_size", [32, 128])
def test_equals_onnxruntimes_quantizer(tiny_bundle, tmp_path, graph, block_size):
    src = Bundle.open(tiny_bundle).graph(graph, "fp32")
    exclude = _exclude(src)
    ours = quantize_int4(src, tmp_path, "q.onnx", block_size, exclude)
    as_matmul, gemms = _gemm_as_matmul(src, tmp_path / "matmul.onnx")
    assert gemms == (graph == "decoder")  # the decoder's LM head
    ref = _ort_quantized(as_matmul, block_size, exclude)
    assert sum(n.op_type == "MatMulNBits" for n in ours.graph.node) > 0
    assert _nodes(ours) == _nodes(ref)
    ref_inits = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    used = {i for n in ours.graph.node for i in n.input}
    for t in ours.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), ref_inits[t.name], err_msg=t.name)
    assert used & set(ref_inits) >= {t.name for t in ours.graph.initializer if t.name in used}


def test_external_data_graph_streams_into_its_own_data_file(tiny_llava_dir, tmp_path):
    """A bundle whose decoder keeps its weights in external data: the INT4 graph's weights go to its own
    .data file (nothing read from the source beyond a memory map), and it computes what ORT's quantizer's does."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path / "b"
    export_bundle(tiny_llava_dir, out, PruneConfig(), threshold_mb=0.001)
    src = Bundle.open(out).graph("decoder", "fp32")
    exclude = _exclude(src)
    stage = tmp_path / "stage"
    stage.mkdir()
    ours = quantize_int4(src, stage, "decoder.int4.onnx", 32, exclude)
    assert (stage / "decoder.int4.onnx.data").stat().st_size > 0
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in ours.graph.initializer if t.name.endswith("_Q4"))
    onnx.save_model(ours, stage / "decoder.int4.onnx")
    ref = _ort_quantized(_gemm_as_matmul(src, tmp_path / "matmul.onnx")[0], 32, exclude)
    a = ort.InferenceSession(str(stage / "decoder.int4.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for i in a.get_inputs():
        shape = [d if isinstance(d, int) else (0 if "past" in str(d) else 5 if "seq" in str(d) else 1) for d in i.shape]
        if "position" in i.name:
            feed[i.name] = np.arange(5)[None]
        elif i.type == "tensor(int64)":
            feed[i.name] = np.array(3, np.int64)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    for x, y in zip(a.run(None, feed), b.run(None, feed)):
        np.testing.assert_array_equal(x, y)
