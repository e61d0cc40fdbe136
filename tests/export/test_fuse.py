"""Fused projections (export/fuse.py): one MatMul for q/k/v and one for gate/up per layer, same outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from decoder_graphs import exported_with_data, prefill_feed
from vtprune.export.decoder import export_decoder
from vtprune.export.streaming import Weight, fake_llava
from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava
from vtprune.models.weights import CheckpointWeights


def _weight_matmuls(proto) -> list[str]:
    weights = {t.name for t in proto.graph.initializer}
    return [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_fused_decoder_has_four_weight_matmuls_per_layer_and_the_unfused_outputs(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig())
    cfg = model.config.text_config
    fused, plain = exported_with_data(model), exported_with_data(model, fuse=False)
    names = _weight_matmuls(fused)
    L = cfg.num_hidden_layers
    assert len(_weight_matmuls(plain)) - len(names) == 3 * L  # q, k, v -> 1 and gate, up -> 1 in every layer
    streamed = _weight_matmuls(export_decoder(fake_llava(tiny_llava_dir, PruneConfig()), read=CheckpointWeights.open(tiny_llava_dir).tensor))
    assert sum(".q_k_v_proj." in n for n in streamed) == L and sum(".gate_up_proj." in n for n in streamed) == L
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fused, plain))
    Dh = cfg.hidden_size // cfg.num_attention_heads
    feed = prefill_feed(a, cfg.hidden_size, L, cfg.num_key_value_heads, Dh)
    outs_a, outs_b = a.run(None, feed), b.run(None, feed)
    for x, y in zip(outs_a, outs_b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    names_out = [o.name for o in a.get_outputs()]
    step = dict(feed, inputs_embeds=feed["inputs_embeds"][:, :1], position_ids=np.array([[6]]))  # a decode step
    step.update({n.replace("present.", "past."): v for n, v in zip(names_out, outs_a) if n.startswith("present.")})
    for x, y in zip(a.run(None, step), b.run(None, step)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_a_weight_of_several_sources_is_their_transposes_side_by_side():
    rng = np.random.default_rng(0)
    parts = {"q": rng.standard_normal((4, 3)), "k": rng.standard_normal((2, 3)), "v": rng.standard_normal((2, 3))}
    value = ir.Value(name="qkv", shape=ir.Shape([3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    w = Weight(value, ("q", "k", "v"), (1, 0))
    np.testing.assert_array_equal(w.array(parts.__getitem__), np.concatenate([parts[s].T for s in "qkv"], axis=1))
    assert Weight(value, "q", (1, 0)).sources == ("q",)
