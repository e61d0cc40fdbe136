"""`vtprune demo`: the shipped bundle answers on the runtime, exactly as the PyTorch reference does (--compare) and
as a fresh export of the shipped checkpoint does; the figures go to stdout, both PNGs are written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vtprune import demo
from vtprune.cli import main
from vtprune.models.embedded import data
from vtprune.models.preprocess import preprocess
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline


def run_demo(capsys, *argv) -> dict:
    code = main(["demo", *map(str, argv), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_the_shipped_bundles_answer_equals_the_references(tmp_path, capsys):
    r = run_demo(capsys, "--out", tmp_path / "demo", "--compare", "--decode-steps", "8")
    assert r["bundle"] == str(demo.SHIPPED_BUNDLE)
    ref = r["reference"]
    assert ref["backend"] == "torch" and r["timed"]["backend"] == "onnx"
    assert ref["token_ids"] == r["token_ids"] and ref["text"] == r["text"] and ref["same_answer"] is True
    assert r["text"] == r["ground_truth"] == demo.sample_item().answer  # the sample is one it answers right
    assert ref["visual_tokens_kept"] == r["visual_tokens_kept"] < r["visual_tokens_total"] == 576
    for t in (ref, r["timed"]):  # timed over the steps asked for, not the answer's one or two
        assert t["decode_steps"] == 8 and t["decode_ms_per_token"] > 0 and t["ttft_ms"] > 0
    assert r["speedup"]["decode"] == pytest.approx(ref["decode_ms_per_token"] / r["timed"]["decode_ms_per_token"], rel=0.01)
    for key in ("kept_patches_png", "cls_curve_png"):
        with Image.open(r[key]) as im:
            assert im.format == "PNG" and im.width > 300


def test_the_shipped_bundle_answers_as_a_fresh_export(tmp_path):
    """models/embedded/bundle is the shipped checkpoint's export (with the pruning config its manifest records):
    same tokens and kept patches on 30 test items, in fp32; its INT8 variant opens and answers. Re-export it
    (export_bundle(default_model_dir(), ..., PruneConfig()) then `vtprune quantize --precision int8`) whenever the
    checkpoint or the exporter changes."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig
    from vtprune.models.loading import default_model_dir

    recorded = Bundle.open(demo.SHIPPED_BUNDLE).manifest["prune"]
    export_bundle(default_model_dir(), tmp_path / "fresh", PruneConfig(**recorded))
    shipped, fresh = Pipeline(Bundle.open(demo.SHIPPED_BUNDLE)), Pipeline(Bundle.open(tmp_path / "fresh"))
    assert shipped.prune == fresh.prune
    np.testing.assert_array_equal(shipped.embed_tokens, fresh.embed_tokens)
    for i in range(30):
        s = data.make_sample("test", 0, i)
        prompt = shipped.tokenizer.build(s.question, shipped.template)
        pixels = preprocess(s.image, shipped.preprocess)
        a, b = shipped.generate(prompt, pixels, max_new_tokens=16), fresh.generate(prompt, pixels, max_new_tokens=16)
        assert (a.token_ids, a.kept_index) == (b.token_ids, b.kept_index), f"test item {i}"
    int8 = Pipeline(Bundle.open(demo.SHIPPED_BUNDLE), "int8")
    assert int8.precision == {"vision": "int8", "decoder": "int8"}
    assert int8.generate(prompt, pixels, max_new_tokens=4).token_ids


def test_demo_on_another_bundle_with_its_reference(tiny_bundle, tiny_llava_dir, tmp_path, capsys):
    r = run_demo(capsys, "--bundle", tiny_bundle, "--model", tiny_llava_dir, "--compare", "--out", tmp_path / "demo",
                 "--max-new-tokens", "4", "--decode-steps", "3")
    assert r["reference"]["token_ids"] == r["token_ids"] and r["reference"]["same_answer"] is True
    assert r["visual_tokens_total"] == 64 and r["visual_tokens_kept"] == len(r["kept_index"])
    assert r["timed"]["decode_steps"] == 3
    # no sample in the bundle: the data set's, saved beside the PNGs
    assert r["image"] == str(tmp_path / "demo" / demo.SAMPLE_IMAGE) and r["question"] == demo.sample_item().question
    assert not list((tmp_path / "demo").glob(".*tmp*"))


def test_demo_prints_its_figures_on_stdout(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "3", "--decode-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "question:" in printed and "answer:" in printed
    for line in ("visual tokens kept", "prompt tokens", "TTFT", "decode", "ms/token (4 steps)"):
        assert line in printed, line
    assert str(out / demo.KEPT_PNG) in printed and str(out / demo.CURVE_PNG) in printed


def test_demo_uses_the_bundles_sample(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    image, question = demo.write_sample(bundle)
    question.write_text("what is red ?\n")
    r = run_demo(capsys, "--bundle", bundle, "--out", tmp_path / "out", "--max-new-tokens", "2", "--decode-steps", "2")
    assert r["image"] == str(image) and r["question"] == "what is red ?"


def test_sample_is_deterministic_and_asks_about_a_present_object():
    a, b = demo.sample_item(), demo.sample_item()
    assert a.question == b.question and a.answer == b.answer and a.image.tobytes() == b.image.tobytes()
    assert a.kind == "exist" and a.answer == "yes" and len(a.objects) >= 3
    named = a.question.removeprefix("Is there a ").removesuffix(" in the image?")
    assert named in [o.name for o in a.objects]


def test_demo_model_without_compare_says_what_replaced_it(tiny_llava_dir, tmp_path, capsys):
    """`demo --model DIR` ran DIR's PyTorch reference before the demo moved to bundles: now one line saying how."""
    assert main(["demo", "--model", str(tiny_llava_dir), "--out", str(tmp_path / "demo")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vtprune: error: --model: ") and "--bundle" in line and "--compare" in line
    assert not (tmp_path / "demo").exists()
