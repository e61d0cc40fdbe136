"""A bundle with the in-place decoder (--decoder-form inplace) runs as the portable one answers: the same tokens,
kept patches, prompt and cache sizes, in `run`, in both chat modes and after quantization, with its cache in
buffers that every decoder call writes where they are (runtime/slots.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtprune.cli import main
from vtprune.models.config import PruneConfig
from vtprune.models.preprocess import preprocess_file
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.chat import Conversation, IndependentTurns
from vtprune.runtime.generate import Pipeline
from vtprune.runtime.slots import SlotCache

from tiny_models import save_tiny_image

QUESTIONS = ["what is red ?", "what is in the image ?", "is the circle blue ?"]
CONFIGS = [PruneConfig(), PruneConfig(heavy_budget=5, recent_budget=3), PruneConfig(text=False)]


@pytest.mark.parametrize("prune", CONFIGS, ids=["default", "budget-8", "no-stage2"])
def test_inplace_answers_as_the_portable_graph(tiny_bundle, tiny_inplace_bundle, tmp_path, prune):
    portable, inplace = Pipeline(Bundle.open(tiny_bundle)), Pipeline(Bundle.open(tiny_inplace_bundle))
    assert inplace.slots and not portable.slots
    for seed in range(4):
        pixels = preprocess_file(save_tiny_image(tmp_path / f"{seed}.png", seed=seed), portable.preprocess)
        prompt = portable.tokenizer.build(QUESTIONS[seed % 3])
        a = portable.generate(prompt, pixels, prune, max_new_tokens=24, stop_at_eos=False)
        b = inplace.generate(prompt, pixels, prune, max_new_tokens=24, stop_at_eos=False)
        for key in ("token_ids", "kept_index", "prompt_tokens", "cache_tokens", "cache_lengths"):
            assert getattr(a, key) == getattr(b, key), (seed, key)


def test_decode_writes_the_buffers_where_they_are(tiny_inplace_bundle, tiny_image):
    """Per decode step only the new token goes in and the logits come out: the cache's OrtValues are the same
    objects at the same addresses before and after, and the count the runtime keeps is what the buffers hold."""
    pipe = Pipeline(Bundle.open(tiny_inplace_bundle))
    prompt = pipe.tokenizer.build("what is red ?")
    pixels = preprocess_file(tiny_image, pipe.preprocess)
    embeds = pipe.splice(prompt, pipe.encode_image(pixels)[0])
    budget = (5, 3)
    cache = pipe.empty_cache(capacity=pipe.cache_capacity(budget, embeds.shape[1] + 30))
    assert isinstance(cache, SlotCache) and cache.capacity == 8
    logits, _, cache = pipe.prefill(embeds, 0, cache, budget)
    before = {name: (value, value.data_ptr()) for name, value in cache.values.items()}
    tokens, lengths, after = pipe.decode(logits, cache, embeds.shape[1], budget, 30, stop_at_eos=False)
    assert after is cache and len(tokens) == 30 and lengths == [8] * 29
    assert all(cache.values[n] is v and v.data_ptr() == p for n, (v, p) in before.items())
    assert cache.held() == cache.length == 8


def test_fork_copies_and_repacks(tiny_inplace_bundle, tiny_image):
    pipe = Pipeline(Bundle.open(tiny_inplace_bundle))
    pixels = preprocess_file(tiny_image, pipe.preprocess)
    embeds = pipe.splice(pipe.tokenizer.build("what is red ?"), pipe.encode_image(pixels)[0])
    L = embeds.shape[1]
    _, _, cache = pipe.prefill(embeds, 0, pipe.empty_cache(capacity=L), (L + 1, 0))
    wide = pipe.fork_cache(cache, L + 5)
    assert wide.capacity == L + 5 and wide.held() == L and cache.held() == L
    for field in ("key", "value", "score"):  # the same entries, each at its position
        a, b = cache.arrays(), wide.arrays()
        for i in range(pipe.num_layers):
            order_a = np.argsort(a[f"past.{i}.pos"], axis=-1)
            order_b = np.argsort(np.where(b[f"past.{i}.pos"] < 0, 1 << 40, b[f"past.{i}.pos"]), axis=-1)[..., :L]
            x = np.take_along_axis(a[f"past.{i}.{field}"], order_a[..., None] if field != "score" else order_a, axis=2)
            y = np.take_along_axis(b[f"past.{i}.{field}"], order_b[..., None] if field != "score" else order_b, axis=2)
            np.testing.assert_array_equal(x, y)
    pipe.step(embeds[:, :1], np.array([[L]]), wide, (L + 2, 0))
    assert wide.held() == L + 1 and cache.held() == L  # the fork is independent


def test_both_chat_modes_answer_as_the_portable_graph(tiny_bundle, tiny_inplace_bundle, tiny_image):
    portable, inplace = Pipeline(Bundle.open(tiny_bundle)), Pipeline(Bundle.open(tiny_inplace_bundle))
    pixels = preprocess_file(tiny_image, portable.preprocess)
    for prune in (PruneConfig(heavy_budget=8, recent_budget=6), PruneConfig(text=False)):
        a, b = Conversation(portable, pixels, prune), Conversation(inplace, pixels, prune)
        for q in QUESTIONS:
            x, y = a.ask(q, max_new_tokens=10), b.ask(q, max_new_tokens=10)
            assert (x.token_ids, x.cache_tokens) == (y.token_ids, y.cache_tokens), q
    a, b = IndependentTurns(portable, pixels), IndependentTurns(inplace, pixels)
    for n, q in enumerate(QUESTIONS * 2):
        x, y = a.ask(q, max_new_tokens=8, temperature=0.8, seed=n), b.ask(q, max_new_tokens=8, temperature=0.8, seed=n)
        assert (x.token_ids, x.cache_tokens, x.prompt_tokens) == (y.token_ids, y.cache_tokens, y.prompt_tokens), q


def test_inplace_bundle_through_the_cli_quantizes_and_runs(tiny_llava_dir, tmp_path, capsys):
    out, portable = tmp_path / "tiny-inplace-cli", tmp_path / "tiny-portable-cli"
    for bundle, form in ((out, "inplace"), (portable, "portable")):
        assert main(["export", "--model", str(tiny_llava_dir), "--out", str(bundle), "--decoder-form", form, "--fp16", "--json"]) == 0
    capsys.readouterr()
    assert json.loads((out / "manifest.json").read_text())["decoder_form"] == "inplace"
    image = save_tiny_image(tmp_path / "0.png", seed=0)
    for precision in ("fp16", "int8", "int4", "int8-static"):  # static int8 calibrates through the in-place cache too
        args = ["quantize", "--precision", precision, "--json"] + (["--calibration-samples", "4"] if precision == "int8-static" else [])
        if precision != "fp16":  # fp16 was exported: its If branches read the casts the converter made (export/fp16.py)
            assert main([args[0], "--bundle", str(out), *args[1:]]) == 0
            assert main(["quantize", "--bundle", str(portable), *args[1:]]) == 0
        capsys.readouterr()
        runs = []
        for bundle in (portable, out):
            assert main(["run", "--bundle", str(bundle), "--precision", precision, "--image", str(image), "--prompt",
                         "what is in the image ?", "--max-new-tokens", "8", "--json"]) == 0
            runs.append(json.loads(capsys.readouterr().out))
        assert runs[0]["cache_tokens"] == runs[1]["cache_tokens"] and len(runs[1]["token_ids"]) == 8, precision
        if precision != "int8-static":  # weight-only quantization: the same weights in both forms; static int8 also
            assert runs[0]["token_ids"] == runs[1]["token_ids"], precision  # quantizes activations the forms lay out differently


def test_vfloor_cannot_take_the_inplace_form(tiny_llava_dir, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_llava_dir), "--out", str(tmp_path / "b"), "--decoder-form", "inplace",
                 "--policy", "vfloor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--decoder-form" in err[0] and not (tmp_path / "b").exists()
