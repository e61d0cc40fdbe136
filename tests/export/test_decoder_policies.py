"""decoder.onnx of each eviction policy against the PyTorch reference: logits within 1e-4 at prefill and over
40 decode steps with eviction active (budgets as inputs), and the cache each head keeps equal to the reference's.
Budgets below the 12-token prompt exercise each policy's prefill cut: on the embeddings (PrefillSelect) for tova
and vfloor, after the whole prompt by its observation window's scores for snapkv. Each policy in the portable
form; the default (snapkv) and vfloor (a signed score, an extra input) also in the fused and ort forms."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vtprune.export.decoder import export_decoder
from vtprune.models.config import POLICIES, PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava

TOL = 1e-4


FORMS = [(p, "portable") for p in POLICIES if p != "h2o"] + [(p, f) for p in ("snapkv", "vfloor") for f in ("fused", "ort")]


@pytest.fixture(scope="module", params=FORMS, ids=[f"{p}-{f}" for p, f in FORMS])  # h2o's portable graph: test_decoder_export
def decoder(request, tiny_llava_dir):
    policy, form = request.param
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(visual=False, policy=policy, snap_window=3, visual_floor=0.4))
    proto = export_decoder(model, opset=24, form=form)
    onnx.checker.check_model(proto, full_check=True)
    return model, proto, ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, feed):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


@pytest.mark.parametrize("heavy,recent", [(4, 3), (0, 5), (6, 0)])
def test_prefill_and_decode_steps_match_the_reference(decoder, heavy, recent):
    model, proto, session = decoder
    policy = model.prune.policy
    assert ("image_span" in {i.name for i in proto.graph.input}) == (policy == "vfloor")
    model.prune = PruneConfig(visual=False, heavy_budget=heavy, recent_budget=recent, policy=policy, snap_window=3,
                              visual_floor=0.4)  # fmt: skip
    cfg = model.config.text_config
    L, span = 12, torch.tensor([2, 8])  # positions 2..7 play the image tokens
    embeds = torch.randn(1, L, cfg.hidden_size, generator=torch.Generator().manual_seed(heavy + 10 * recent))
    logits, cache, positions = model.prefill(embeds, span)
    Hkv, Dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    feed = {"heavy_budget": np.array(heavy), "recent_budget": np.array(recent)}
    if policy == "vfloor":
        feed["image_span"] = span.numpy()
    past = {}
    for i in range(len(model.lm.layers)):
        past[f"past.{i}.key"] = past[f"past.{i}.value"] = np.zeros((1, Hkv, 0, Dh), np.float32)
        past[f"past.{i}.score"] = np.zeros((1, Hkv, 0), np.float32)
    out = _run(session, {"inputs_embeds": embeds.numpy(), "position_ids": np.arange(L)[None], **feed, **past})
    diff = np.abs(out["logits"] - logits[:, -1].numpy()).max()
    assert diff < TOL, f"{policy}: prefill logits differ by {diff:.2e}"
    assert np.array_equal(out["kept_positions"], positions.numpy())
    assert ("PrefillSelect" in {n.op_type for n in proto.graph.node}) == (policy != "snapkv")
    for i in range(len(model.lm.layers)):  # the cache after the prompt: cut to the budget, the same entries kept
        assert out[f"present.{i}.score"].shape[2] == cache.length == min(L, max(heavy + recent, 1))
        np.testing.assert_allclose(np.abs(out[f"present.{i}.score"]), cache.scores[i].numpy(), atol=1e-4)
    token = logits[:, -1].argmax(-1, keepdim=True)
    for step in range(40):
        ref = model.decode_step(token, cache)
        feed_step = {"inputs_embeds": model.lm.embed_tokens(token).detach().numpy(), "position_ids": np.array([[L + step]]), **feed}
        feed_step.update({k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")})
        out = _run(session, feed_step)
        diff = np.abs(out["logits"] - ref[:, -1].numpy()).max()
        assert diff < TOL, f"{policy}, decode step {step}: logits differ by {diff:.2e}"
        for i in range(len(model.lm.layers)):
            score = out[f"present.{i}.score"]
            assert score.shape[2] == cache.length <= max(heavy + recent, 1)
            np.testing.assert_allclose(np.abs(score), cache.scores[i].numpy(), atol=1e-4, err_msg=f"layer {i} scores")
            if policy == "vfloor":  # the graph's sign marks the same entries as the reference's image flags
                np.testing.assert_array_equal(score < 0, cache.visual[i].numpy())
                positions_i = cache.positions[i].numpy()
                np.testing.assert_array_equal(cache.visual[i].numpy(), (positions_i >= 2) & (positions_i < 8))
        token = ref[:, -1].argmax(-1, keepdim=True)
