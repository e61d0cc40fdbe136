"""The decoder forms written with fused attention ops (export/ort_ops.py), against the PyTorch reference: logits, every
layer's cache and Stage-2 scores within 1e-4 at a prefill the budget cuts and over 24 decode steps with eviction,
for each policy and with and without grouped KV heads.
- fused: ONNX opset 24's Attention, RotaryEmbedding, RMSNormalization, Swish (standard ops);
- ort: ONNX Runtime's GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vtprune.cli import main
from vtprune.export.decoder import export_decoder
from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava

from decoder_graphs import empty_cache_feed
from tiny_models import save_tiny_image, save_tiny_llava, save_tiny_tokenizer

TOL = 1e-4
HEAVY, RECENT = 4, 3


@pytest.fixture(scope="module")
def mha_llava_dir(tmp_path_factory):
    return save_tiny_tokenizer(save_tiny_llava(tmp_path_factory.mktemp("tiny-mha"), gqa=False))


def _cache_matches(outs: dict, cache) -> None:
    for i in range(len(cache.keys)):
        np.testing.assert_allclose(outs[f"present.{i}.key"], cache.keys[i].numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(outs[f"present.{i}.value"], cache.values[i].numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(outs[f"present.{i}.score"], cache.scores[i].numpy(), atol=TOL, rtol=1e-5)


FORM_OPS = {  # each layer's fused ops
    "fused": {"Attention": 1, "RotaryEmbedding": 2, "RMSNormalization": 2, "Swish": 1},
    "ort": {"GroupQueryAttention": 1, "RotaryEmbedding": 2, "SkipSimplifiedLayerNormalization": 2},
}
FORM_OPSET = {"fused": 24, "ort": 20}


@pytest.mark.parametrize("form", ["fused", "ort"])
@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])  # vfloor: test_decoder_policies
@pytest.mark.parametrize("grouped", [True, False], ids=["gqa", "mha"])
def test_fused_forms_match_the_reference_through_eviction(form, policy, grouped, tiny_llava_dir, mha_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir if grouped else mha_llava_dir),
                        PruneConfig(visual=False, policy=policy, heavy_budget=HEAVY, recent_budget=RECENT))
    proto = export_decoder(model, opset=FORM_OPSET[form], form=form)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    layers = len(model.lm.layers)
    assert {op: ops[op] for op in FORM_OPS[form]} == {op: n * layers for op, n in FORM_OPS[form].items()}
    assert ops["KVEvict"] == 1  # one call evicts every layer's cache
    assert ops["Softmax"] == 0  # attention is the fused op's, not the decomposition's
    assert ops["Sigmoid"] == (0 if form == "fused" else layers)  # SiLU: Swish at opset 24
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    budget = {"heavy_budget": np.array(HEAVY), "recent_budget": np.array(RECENT)}
    D = model.config.text_config.hidden_size
    embeds = torch.randn(1, 12, D, generator=torch.Generator().manual_seed(1))  # 12 > 7: the budget cuts the prompt
    logits, cache, positions = model.prefill(embeds)
    outs = dict(zip(names, session.run(names, {"inputs_embeds": embeds.numpy(), "position_ids": np.arange(12)[None],
                                              **budget, **empty_cache_feed(model)})))
    np.testing.assert_allclose(outs["logits"], logits[:, -1].numpy(), atol=TOL, rtol=0)
    assert outs["kept_positions"].tolist() == positions.tolist()
    _cache_matches(outs, cache)
    for step in range(24):
        token = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(100 + step))
        position = cache.next_position
        cache.next_position += 1
        with torch.no_grad():
            ref = model._decoder(token, torch.tensor([[position]]), cache)
        past = {n.replace("present.", "past.", 1): v for n, v in outs.items() if n.startswith("present.")}
        outs = dict(zip(names, session.run(names, {"inputs_embeds": token.numpy(), "position_ids": np.array([[position]]),
                                                  **budget, **past})))
        np.testing.assert_allclose(outs["logits"], ref[:, -1].numpy(), atol=TOL, rtol=0)
        assert outs["present.0.key"].shape[2] == HEAVY + RECENT
    _cache_matches(outs, cache)


def test_ort_form_has_fewer_nodes_than_the_portable_graph(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig())
    portable, fused = (len(export_decoder(model, form=f).graph.node) for f in ("portable", "ort"))
    assert fused < portable / 2, (fused, portable)


@pytest.fixture(scope="module")
def ort_bundle(tiny_llava_dir, tmp_path_factory):
    """Exported through the CLI, as a user would."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-ort-cli"
    assert main(["export", "--model", str(tiny_llava_dir), "--out", str(out), "--decoder-form", "ort", "--json"]) == 0
    return out


def _run(capsys, *argv):
    assert main(["run", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ort_bundle_answers_as_the_reference_and_quantizes(ort_bundle, tiny_llava_dir, tmp_path, capsys):
    assert json.loads((ort_bundle / "manifest.json").read_text())["decoder_form"] == "ort"
    for seed in range(6):
        image = save_tiny_image(tmp_path / f"{seed}.png", seed=seed)
        args = ["--image", image, "--prompt", "what is in the image ?", "--max-new-tokens", "8"]
        onnx_out = _run(capsys, "--bundle", ort_bundle, *args)
        torch_out = _run(capsys, "--model", tiny_llava_dir, *args)
        for key in ("token_ids", "kept_index", "prompt_tokens", "cache_tokens"):
            assert onnx_out[key] == torch_out[key], (seed, key)
    for precision in ("int8", "int4"):  # ORT's quantizers rewrite the MatMuls; the contrib ops stay fp32
        assert main(["quantize", "--bundle", str(ort_bundle), "--precision", precision, "--json"]) == 0
        capsys.readouterr()
        out = _run(capsys, "--bundle", ort_bundle, "--precision", precision, "--image", tmp_path / "0.png",
                   "--prompt", "what is in the image ?", "--max-new-tokens", "8")
        assert len(out["token_ids"]) >= 1


def test_the_fused_form_refuses_an_opset_without_its_ops(tiny_llava_dir, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_llava_dir), "--out", str(tmp_path / "b"), "--opset", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--opset" in err[0] and "portable" in err[0] and not (tmp_path / "b").exists()
