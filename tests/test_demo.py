"""`vtprune demo`: streams an answer, writes both PNGs, and uses the model folder's sample when there is one."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from vtprune.cli import main
from vtprune import demo


def test_demo_writes_both_pngs(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tiny_llava_dir), "--out", str(out), "--max-new-tokens", "4", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("kept_patches_png", "cls_curve_png"):
        with Image.open(r[key]) as im:
            assert im.format == "PNG" and im.width > 300
    assert r["visual_tokens_total"] == 64 and r["visual_tokens_kept"] == len(r["kept_index"])
    assert 1 <= r["visual_tokens_kept"] <= 64
    # no sample in the model folder: the data set's, saved beside the PNGs
    assert r["image"] == str(out / demo.SAMPLE_IMAGE) and r["question"] == demo.sample_item().question
    assert not list(out.glob(".*tmp*"))


def test_demo_prints_the_paths_and_streams(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_llava_dir), "--out", str(out), "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "question:" in printed and "answer:" in printed
    assert str(out / demo.KEPT_PNG) in printed and str(out / demo.CURVE_PNG) in printed


def test_demo_uses_the_model_folders_sample(tiny_llava_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model)
    image, question = demo.write_sample(model)
    question.write_text("what is red ?\n")
    main(["demo", "--model", str(model), "--out", str(tmp_path / "out"), "--max-new-tokens", "2", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["image"] == str(image) and r["question"] == "what is red ?"


def test_sample_is_deterministic_and_asks_about_a_present_object():
    a, b = demo.sample_item(), demo.sample_item()
    assert a.question == b.question and a.answer == b.answer and a.image.tobytes() == b.image.tobytes()
    assert a.kind == "exist" and a.answer == "yes" and len(a.objects) >= 3
    named = a.question.removeprefix("Is there a ").removesuffix(" in the image?")
    assert named in [o.name for o in a.objects]
