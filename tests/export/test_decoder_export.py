"""decoder.onnx against the PyTorch reference: logits within 1e-4 at prefill and over 64 decode steps with
eviction active, Stage-2 prefill selection inside the graph, budgets as inputs. The graph here is h2o's (the
paper's), which selects the prompt's tokens on their embeddings; test_decoder_policies runs the others."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vtprune.export.decoder import export_decoder
from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava

from decoder_graphs import empty_cache_feed, label_sizes

TOL = 1e-4


@pytest.fixture(scope="module")
def decoder(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(visual=False, policy="h2o"))
    proto = export_decoder(model)
    onnx.checker.check_model(proto, full_check=True)
    return model, proto, ort.InferenceSession(proto.SerializeToString())


def _run(session, feed):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def test_graph_has_the_custom_domain_ops(decoder):
    _, proto, _ = decoder
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert ("ai.vtprune", "PrefillSelect") in ops and ("ai.vtprune", "KVEvict") in ops
    assert any(o.domain == "ai.vtprune" for o in proto.opset_import)
    assert any(n.name.startswith("/lm/layers.0/self_attn") for n in proto.graph.node)  # readable names


@pytest.mark.parametrize("heavy,recent", [(4, 3), (0, 5), (6, 0), (1000, 0)])
def test_prefill_and_64_decode_steps_match_the_reference(decoder, heavy, recent):
    model, _, session = decoder
    model.prune = PruneConfig(visual=False, heavy_budget=heavy, recent_budget=recent, policy="h2o")
    L = 12
    embeds = torch.randn(1, L, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(heavy))
    logits, cache, positions = model.prefill(embeds)
    budget = {"heavy_budget": np.array(heavy), "recent_budget": np.array(recent)}
    out = _run(session, {"inputs_embeds": embeds.numpy(), "position_ids": np.arange(L)[None], **budget, **empty_cache_feed(model)})
    diff = np.abs(out["logits"] - logits[:, -1].numpy()).max()
    assert diff < TOL, f"prefill logits differ by {diff:.2e}"
    assert np.array_equal(out["kept_positions"], positions.numpy())
    token = logits[:, -1].argmax(-1, keepdim=True)
    for step in range(64):
        ref = model.decode_step(token, cache)
        feed = {"inputs_embeds": model.lm.embed_tokens(token).detach().numpy(), "position_ids": np.array([[L + step]]), **budget}
        feed.update({k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")})
        out = _run(session, feed)
        diff = np.abs(out["logits"] - ref[:, -1].numpy()).max()
        assert diff < TOL, f"decode step {step}: logits differ by {diff:.2e}"
        assert out["present.0.key"].shape[2] == cache.length <= max(heavy + recent, 1)
        token = ref[:, -1].argmax(-1, keepdim=True)


def test_every_labelled_dimension_names_one_size(decoder):
    """ONNX Runtime's memory planner reuses buffers by symbolic dimension: one name must be one size in a run.
    Every labelled tensor of a prefill that Stage 2 shortens (seq 12 -> kept 7), made a graph output, has the
    size its labels say (the dense stack's tensors were once labelled `seq` where they are `kept` long)."""
    model, proto, _ = decoder
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    labelled = [v for v in probe.graph.value_info if any(d.dim_param for d in v.type.tensor_type.shape.dim)]
    assert labelled
    probe.graph.output.extend(labelled)
    session = ort.InferenceSession(probe.SerializeToString())
    L, hidden = 12, model.config.text_config.hidden_size
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, L, hidden)).astype(np.float32),
            "position_ids": np.arange(L)[None], "heavy_budget": np.array(4), "recent_budget": np.array(3),
            **empty_cache_feed(model)}
    sizes = label_sizes(session, feed)
    assert sizes["seq"] == {12} and sizes["kept"] == {7}
    assert {label: s for label, s in sizes.items() if len(s) > 1} == {}


@pytest.mark.parametrize("heavy,recent,scored", [(6, 6, False), (100, 0, False), (4, 3, True)])
def test_prefill_scores_only_when_the_budget_can_drop_a_token_and_the_head_runs_once(decoder, tmp_path, heavy, recent, scored):
    """ONNX Runtime's profile of one 12-token prefill: the S x S similarity (the MatMul `pf_dots`) runs only when
    heavy + recent < 12; a budget that covers the prompt (every decode step too) passes the tokens through."""
    import json

    model, proto, _ = decoder
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(proto.SerializeToString(), options)
    L, hidden = 12, model.config.text_config.hidden_size
    feed = {"inputs_embeds": np.random.default_rng(1).standard_normal((1, L, hidden)).astype(np.float32),
            "position_ids": np.arange(L)[None], "heavy_budget": np.array(heavy), "recent_budget": np.array(recent),
            **empty_cache_feed(model)}
    kept = _run(session, feed)["kept_positions"]
    events = json.loads(open(session.end_profiling()).read())
    ran = {e["name"] for e in events if e.get("cat") == "Node"}
    assert any("PrefillSelect" in n for n in ran)
    assert any("PrefillSelect/pf_dots" in n for n in ran) == scored
    assert kept.shape[1] == min(L, heavy + recent)
    # the LM head runs on the last position only (its logits are the only ones read)
    head = [e for e in events if e.get("cat") == "Node" and e["name"].startswith("/lm_head/") and "input_type_shape" in e.get("args", {})]
    assert head
    for e in head:
        shape = next(iter(e["args"]["input_type_shape"][0].values()))
        assert np.prod(shape) == hidden, shape
