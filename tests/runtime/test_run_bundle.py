"""`vtprune run --bundle` (ONNX Runtime, no torch) answers like the torch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtprune.cli import main
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline, sample

from tiny_models import save_tiny_image


def _run(capsys, *argv):
    assert main(["run", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bundle_and_torch_give_the_same_tokens_on_20_images(tiny_llava_dir, tiny_bundle, tmp_path, capsys):
    ks = set()
    for seed in range(20):
        image = save_tiny_image(tmp_path / f"{seed}.png", seed=seed)
        args = ["--image", image, "--prompt", "what is in the image ?", "--max-new-tokens", "8"]
        onnx_out = _run(capsys, "--bundle", tiny_bundle, *args)
        torch_out = _run(capsys, "--model", tiny_llava_dir, *args)
        for key in ("input_ids", "token_ids", "kept_index", "visual_tokens_kept", "prompt_tokens", "cache_tokens"):
            assert onnx_out[key] == torch_out[key], (seed, key)
        ks.add(onnx_out["visual_tokens_kept"])
    assert len(ks) > 1


def test_cache_never_exceeds_the_budget_over_a_long_generation(tiny_bundle, tiny_image):
    from vtprune.models.config import PruneConfig
    from vtprune.models.preprocess import preprocess_file

    pipe = Pipeline(Bundle.open(tiny_bundle))
    prompt = pipe.tokenizer.build("what is red ?")
    prune = PruneConfig(heavy_budget=6, recent_budget=4)
    result = pipe.generate(prompt, preprocess_file(tiny_image, pipe.preprocess), prune, max_new_tokens=300, stop_at_eos=False)
    assert len(result.token_ids) == 300
    assert max(result.cache_lengths) == 10 and result.prompt_tokens == prompt.length_with_image(result.visual_tokens_kept) > 10


def test_sampling_is_seeded_and_respects_top_p():
    logits = np.array([5.0, 4.0, 0.0, -1.0])
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, 0.5, rng) for _ in range(200)}
    assert draws == {0}  # the nucleus of mass 0.5 holds only the top token (p = 0.71)
    draws = [sample(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(50)]
    assert set(draws) >= {0, 1} and draws == [sample(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(50)]
    assert sample(logits, 0.0, 1.0, rng) == 0


def test_io_binding_path_gives_the_same_tokens(tiny_bundle, tiny_image):
    """The device-resident cache path (CUDA in production) run on the CPU device: same answer as plain arrays."""
    from vtprune.models.preprocess import preprocess_file

    plain = Pipeline(Bundle.open(tiny_bundle))
    bound = Pipeline(Bundle.open(tiny_bundle), cache_device="cpu")
    prompt = plain.tokenizer.build("what is red ?")
    pixels = preprocess_file(tiny_image, plain.preprocess)
    a = plain.generate(prompt, pixels, max_new_tokens=20, stop_at_eos=False)
    b = bound.generate(prompt, pixels, max_new_tokens=20, stop_at_eos=False)
    assert a.token_ids == b.token_ids and a.cache_lengths == b.cache_lengths


@pytest.mark.parametrize("bundle", ["tiny_bundle", "tiny_h2o_bundle", "tiny_ort_bundle", "tiny_inplace_bundle"])
def test_sessions_log_warnings_and_a_pruned_run_gives_none(bundle, tiny_image, capfd, request):
    """The sessions log at warning level (nothing the graphs do is expected to warn), and a run whose prefill
    Stage 2 cuts (snapkv: the cache after the prompt; h2o: the prompt itself), then 20 decode steps with eviction,
    prints no ONNX Runtime warning: no memory-planner "Shape mismatch attempting to re-use buffer", no initializer
    doubling as an input."""
    from vtprune.models.config import PruneConfig
    from vtprune.models.preprocess import preprocess_file

    bundle = request.getfixturevalue(bundle)  # exported before the capture starts
    capfd.readouterr()
    pipe = Pipeline(Bundle.open(bundle))
    assert pipe.decoder.get_session_options().log_severity_level == 2 == pipe.vision.get_session_options().log_severity_level
    prompt = pipe.tokenizer.build("what is red ?")
    result = pipe.generate(prompt, preprocess_file(tiny_image, pipe.preprocess), PruneConfig(heavy_budget=5, recent_budget=3),
                           max_new_tokens=20, stop_at_eos=False)
    full = prompt.length_with_image(result.visual_tokens_kept)
    assert result.prompt_tokens == (8 if pipe.prune.policy == "h2o" else full) and full > 8
    assert max(result.cache_lengths) == 8 and len(result.token_ids) == 20
    err = capfd.readouterr().err
    assert "onnxruntime" not in err, err[:500]
