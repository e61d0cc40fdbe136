"""Streaming dynamic INT8 (quant/int8_stream.py) against ONNX Runtime's own `quantize_dynamic` on the same graph:
the same nodes and names, the same int8 weights, scales and zero points, the same outputs; and a graph with
external data quantized into its own data file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from vtprune.quant.int8_stream import REDUCE_RANGE, quantize_int8
from vtprune.quant.quantize import QUANT_OPS, activation_matmuls, quiet_quantizer_logs, score_path_nodes
from vtprune.runtime.bundle import Bundle


def quantize_dynamic_reference(src, dst, exclude):
    """ONNX Runtime's own dynamic quantizer, as vtprune ran it before it streamed (the oracle)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_quantizer_logs():
        quantize_dynamic(src, dst, op_types_to_quantize=QUANT_OPS, per_channel=True, reduce_range=REDUCE_RANGE,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})


def _exclude(src):
    structure = onnx.load(str(src), load_external_data=False)
    return list(dict.fromkeys(score_path_nodes(structure) + activation_matmuls(structure)))


def _feed(session, seq=5):
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (0 if "past" in str(d) else seq if "seq" in str(d) else 1) for d in i.shape]
        if "position" in i.name:
            feed[i.name] = np.arange(seq)[None]
        elif i.type == "tensor(int64)":
            feed[i.name] = np.array(3, np.int64)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def test_streaming_int8_equals_ort_quantize_dynamic(tiny_bundle, tmp_path):
    src = Bundle.open(tiny_bundle).graph("decoder", "fp32")
    exclude = _exclude(src)
    ours = quantize_int8(src, tmp_path, "decoder.int8.onnx", exclude)
    quantize_dynamic_reference(src, tmp_path / "ref.onnx", exclude)
    ref = onnx.load(str(tmp_path / "ref.onnx"))
    # the same nodes (ORT's quantizer sorts them its own way), wired the same
    assert sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in ours.graph.node) == sorted(
        (n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in ref.graph.node)
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    quantized = [n for n in b if n.endswith("_quantized")]
    assert quantized and set(quantized) <= set(a)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    sa = ort.InferenceSession(ours.SerializeToString(), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = _feed(sa)
    for x, y in zip(sa.run(None, feed), sb.run(None, feed)):
        np.testing.assert_array_equal(x, y)


def test_external_data_graph_streams_into_its_own_int8_data_file(tiny_llava_dir, tmp_path):
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path / "b"
    export_bundle(tiny_llava_dir, out, PruneConfig(), threshold_mb=0.001)
    src = Bundle.open(out).graph("decoder", "fp32")
    stage = tmp_path / "stage"
    stage.mkdir()
    ours = quantize_int8(src, stage, "decoder.int8.onnx", _exclude(src))
    assert (stage / "decoder.int8.onnx.data").stat().st_size > 0
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in ours.graph.initializer if t.name.endswith("_quantized"))
    onnx.save_model(ours, stage / "decoder.int8.onnx")
    onnx.checker.check_model(str(stage / "decoder.int8.onnx"), full_check=True)
    session = ort.InferenceSession(str(stage / "decoder.int8.onnx"), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, _feed(session))[0]).all()
