"""Round 2 of the bad-input corpus (issue 20): manifests that reach outside the bundle or disagree with its files,
model folders whose headers or configs lie, images whose headers lie, command-line values out of range.

Same contract as tests/test_bad_inputs.py, whose helpers these cases reuse: exit 0, or exit 2 with one line
`vtprune: error: <where>: ...` naming the file or option, no traceback, nothing added, removed or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_bad_inputs import (Case, copy_bundle, copy_model, edit_json, run_bundle, run_cli, run_torch, sha256, sharded,
                             snapshot, tmp_file)


def manifest_of(c) -> str:
    return str(c.tmp / "bundle" / "manifest.json")


def in_bundle(name: str):
    return lambda c: str((c.tmp / "bundle" / name).resolve())


def in_model(name: str):
    return lambda c: str(c.tmp / "model" / name)


def bundle_run(*extra, **kw):
    return run_bundle(*extra, bundle=tmp_file("bundle"), **kw)


def bundle_sample_run(c):
    return ["run", "--bundle", c.tmp / "bundle", "--max-new-tokens", "2", "--json"]


def edit_manifest(edit):
    def setup(c):
        edit_json(copy_bundle(c) / "manifest.json", edit)
    return setup


def sample_outside(c):
    """The issue's case: a sample naming an absolute image and a `..` question; `run --bundle B` alone must not read them."""
    b = copy_bundle(c)
    shutil.copyfile(c.image, c.tmp / "secret.png")
    (c.tmp / "secret.txt").write_text("the secret")
    edit_json(b / "manifest.json", lambda d: d.update(sample={"image": str(c.tmp / "secret.png"), "question": "../secret.txt"}))


def sample_linked_out(c):
    b = copy_bundle(c)
    shutil.copyfile(c.image, b / "sample.png")
    (c.tmp / "secret.txt").write_text("the secret")
    (b / "sample_question.txt").symlink_to(c.tmp / "secret.txt")
    edit_json(b / "manifest.json", lambda d: d.update(sample={"image": "sample.png", "question": "sample_question.txt"}))


def sample_inside(c):
    b = copy_bundle(c)
    shutil.copyfile(c.image, b / "sample.png")
    (b / "sample_question.txt").write_text("what is in the image ?\n")
    edit_json(b / "manifest.json", lambda d: d.update(sample={"image": "sample.png", "question": "sample_question.txt"}))


def sample_question_not_utf8(c):
    sample_inside(c)
    (c.tmp / "bundle" / "sample_question.txt").write_bytes(b"what \xff\xfe ?")


def graph_swapped(c):
    """vision.onnx replaced by another valid graph (the decoder), checksum updated: the io table disagrees."""
    b = copy_bundle(c)
    shutil.copyfile(b / "decoder.onnx", b / "vision.onnx")
    edit_json(b / "manifest.json", lambda d: d["graphs"]["vision"]["fp32"]["sha256"].update({"vision.onnx": sha256(b / "vision.onnx")}))


def npy_header_lies(rows: int, manifest_agrees: bool):
    """embed_tokens.npy whose header claims `rows` rows (data unchanged); the checksum updated, and the manifest's
    shape too when `manifest_agrees`."""
    def setup(c):
        b = copy_bundle(c)
        f = b / "embed_tokens.npy"
        data = f.read_bytes()
        header_len = struct.unpack("<H", data[8:10])[0]
        header = data[10:10 + header_len].decode("latin1")
        cols = json.loads(manifest_text(b))["model"]["hidden_size"]
        new = header.replace(header[header.index("(") : header.index(")") + 1], f"({rows}, {cols})")
        new = new.rstrip("\n").rstrip(" ")
        new = new + " " * (header_len - len(new) - 1) + "\n"
        f.write_bytes(data[:10] + new.encode("latin1") + data[10 + header_len :])

        def edit(d):
            d["embed_tokens"].update(sha256=sha256(f))
            if manifest_agrees:
                d["embed_tokens"].update(shape=[rows, cols])
                d["model"]["vocab_size"] = rows
        edit_json(b / "manifest.json", edit)
    return setup


def truncated_npy(c):
    """embed_tokens.npy cut in half, the checksum updated: the header's shape needs more bytes than the file holds."""
    b = copy_bundle(c)
    f = b / "embed_tokens.npy"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    edit_json(b / "manifest.json", lambda d: d["embed_tokens"].update(sha256=sha256(f)))


def manifest_text(b: Path) -> str:
    return (b / "manifest.json").read_text()


def tokenizer_ids_past_table(c, folder: str = "bundle"):
    b = copy_bundle(c) if folder == "bundle" else copy_model(c)
    edit_json(b / "tokenizer.json", lambda d: d["added_tokens"].append(
        {"id": 4000, "content": "<far>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}))


def deep_json(name: str, folder: str = "bundle"):
    def setup(c):
        root = copy_bundle(c) if folder == "bundle" else copy_model(c)
        (root / name).write_text("[" * 200_000 + "]" * 200_000)
    return setup


def edit_header(edit, shard: bool = False):
    """The tiny checkpoint with its safetensors header rewritten by `edit` (the data bytes unchanged)."""
    def setup(c):
        f = copy_model(c) / "model.safetensors"
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header = edit(header) or header
        text = json.dumps(header).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return setup


def deep_header(c):
    f = copy_model(c) / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    text = b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def overlap(header: dict) -> None:
    names = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    a, b = header[names[0][1]], header[names[1][1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])  # same size: b now overlaps a exactly
    else:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]


def edit_config(edit):
    def setup(c):
        edit_json(copy_model(c) / "config.json", edit)
    return setup


def transformers5_processor(c):
    """The layout transformers 5's LlavaProcessor.save_pretrained writes: processor_config.json with the image
    processor nested, no preprocessor_config.json."""
    m = copy_model(c)
    pre = json.loads((m / "preprocessor_config.json").read_text())
    (m / "preprocessor_config.json").unlink()
    (m / "processor_config.json").write_text(json.dumps({"image_processor": pre, "processor_class": "LlavaProcessor",
                                                         "image_token": "<image>", "patch_size": 14}))


def ico_with_huge_png(c):
    """An ICO whose directory says 16 x 16 but whose one entry is a 13000 x 13000 PNG (the issue's case)."""
    from test_bad_inputs import png_bytes

    png = png_bytes(13000, 13000, 8, 0, b"\x00" * 64)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    (c.tmp / "icon.ico").write_bytes(struct.pack("<HHH", 0, 1, 1) + entry + png)


MODEL = lambda c: c.tmp / "model"  # noqa: E731

CASES = [
    # ---- every path the manifest names stays inside the bundle, the sample included
    Case("sample-outside-the-bundle", bundle_sample_run, manifest_of, "outside the bundle", sample_outside),
    Case("sample-question-linked-out", bundle_sample_run, manifest_of, "outside the bundle", sample_linked_out),
    Case("sample-inside-works", bundle_sample_run, None, setup=sample_inside),
    Case("sample-question-not-utf8", bundle_sample_run, in_bundle("sample_question.txt"), "UTF-8", sample_question_not_utf8),
    # ---- the schema: every field typed, named in the error
    Case("manifest-sha256-a-number", bundle_run(), manifest_of, "embed_tokens.sha256",
         edit_manifest(lambda d: d["embed_tokens"].update(sha256=5))),
    Case("manifest-graph-sha256-a-list", bundle_run(), manifest_of, "graphs.decoder.fp32.sha256",
         edit_manifest(lambda d: d["graphs"]["decoder"]["fp32"].update(sha256=["x"]))),
    Case("manifest-alpha-a-string", bundle_run(), manifest_of, "prune.alpha",
         edit_manifest(lambda d: d["prune"].update(alpha="0.1"))),
    Case("manifest-alpha-out-of-range", bundle_run(), manifest_of, "prune.alpha",
         edit_manifest(lambda d: d["prune"].update(alpha=5))),
    Case("manifest-k-min-huge", bundle_run(), manifest_of, "prune.",
         edit_manifest(lambda d: d["prune"].update(heavy_budget=2**70))),
    Case("manifest-sample-a-list", bundle_run(), manifest_of, "sample", edit_manifest(lambda d: d.update(sample=["a", "b"]))),
    Case("manifest-provider-options-a-list", bundle_run(), manifest_of, "provider_options",
         edit_manifest(lambda d: d["graphs"]["decoder"]["fp32"].update(provider_options=["x"]))),
    Case("manifest-a-list", bundle_run(), manifest_of, "format_version", lambda c: (copy_bundle(c) / "manifest.json").write_text("[]")),
    Case("manifest-nested-deeply", bundle_run(), manifest_of, "nested too deeply", deep_json("manifest.json")),
    Case("manifest-num-layers-huge", bundle_run(), manifest_of, "model.num_layers",
         edit_manifest(lambda d: d["model"].update(num_layers=10**9))),
    Case("manifest-template-without-question", bundle_run(), "prompt template", "{question}",
         edit_manifest(lambda d: d.update(prompt_template="USER: <image> ASSISTANT:"))),
    Case("manifest-preprocessor-absolute", bundle_run(), manifest_of, "outside the bundle",
         edit_manifest(lambda d: d.update(preprocessor="/etc/passwd"))),
    # ---- the manifest against the bundle's files
    Case("manifest-num-layers-disagrees", bundle_run(), manifest_of, "model.num_layers",
         edit_manifest(lambda d: d["model"].update(num_layers=3))),
    Case("manifest-num-kv-heads-disagrees", bundle_run(), manifest_of, "model.num_kv_heads",
         edit_manifest(lambda d: d["model"].update(num_kv_heads=4))),
    Case("manifest-vision-graph-swapped", bundle_run(), manifest_of, "io.vision", graph_swapped),
    Case("embeddings-header-claims-1e12-rows", bundle_run(), in_bundle("embed_tokens.npy"), "header's shape",
         npy_header_lies(10**12, manifest_agrees=False)),
    Case("embeddings-truncated-rehashed", bundle_run(), in_bundle("embed_tokens.npy"), "bytes of data", truncated_npy),
    Case("embeddings-shape-differs-from-model", bundle_run(), manifest_of, "embed_tokens.shape",
         edit_manifest(lambda d: d["embed_tokens"].update(shape=[64, 32]))),
    Case("tokenizer-ids-past-the-table", bundle_run(), in_bundle("tokenizer.json"), "embedding table", tokenizer_ids_past_table),
    Case("tokenizer-config-nested-deeply", bundle_run(), in_bundle("tokenizer_config.json"), "nested too deeply",
         deep_json("tokenizer_config.json")),
    # ---- model folders: safetensors headers (one validator for the reference and the streaming export)
    Case("ckpt-header-a-list", run_torch(model=MODEL), in_model("model.safetensors"), "JSON list", edit_header(lambda h: [h])),
    Case("ckpt-header-unknown-dtype", run_torch(model=MODEL), in_model("model.safetensors"), "dtype 'F17'",
         edit_header(lambda h: first_tensor(h).update(dtype="F17"))),
    Case("ckpt-header-shape-1e9-squared", run_torch(model=MODEL), in_model("model.safetensors"), "needs",
         edit_header(lambda h: first_tensor(h).update(shape=[10**9, 10**9]))),
    Case("ckpt-header-shape-a-string", run_torch(model=MODEL), in_model("model.safetensors"), "shape",
         edit_header(lambda h: first_tensor(h).update(shape="big"))),
    Case("ckpt-header-overlapping-offsets", run_torch(model=MODEL), in_model("model.safetensors"), "safetensors",
         edit_header(overlap)),
    Case("ckpt-header-offsets-out-of-bounds", run_torch(model=MODEL), in_model("model.safetensors"), "truncated?",
         edit_header(lambda h: first_tensor(h).update(data_offsets=[0, 2**40]))),
    Case("ckpt-header-metadata-not-strings", run_torch(model=MODEL), in_model("model.safetensors"), "__metadata__",
         edit_header(lambda h: h.update(__metadata__={"format": 3}))),
    Case("ckpt-header-nested-deeply", run_torch(model=MODEL), in_model("model.safetensors"), "nested too deeply",
         deep_header),
    Case("ckpt-index-values-not-strings", run_torch(model=MODEL), in_model("model.safetensors.index.json"), "weight_map",
         lambda c: (lambda m: edit_json(m / "model.safetensors.index.json",
                                        lambda d: d["weight_map"].update({"extra.weight": 3})))(sharded(c))),
    Case("export-header-unknown-dtype", lambda c: ["export", "--model", c.tmp / "model", "--out", c.tmp / "out"],
         in_model("model.safetensors"), "dtype", edit_header(lambda h: first_tensor(h).update(dtype="Q4"))),
    # ---- config.json: types, ranges, agreement with the weights, before anything is built
    Case("ckpt-config-1e9-layers", run_torch(model=MODEL), in_model("config.json"), "num_hidden_layers",
         edit_config(lambda d: d["text_config"].update(num_hidden_layers=10**9))),
    Case("export-config-1e9-layers", lambda c: ["export", "--model", c.tmp / "model", "--out", c.tmp / "out"],
         in_model("config.json"), "num_hidden_layers", edit_config(lambda d: d["text_config"].update(num_hidden_layers=10**9))),
    Case("ckpt-config-layers-disagree", run_torch(model=MODEL), in_model("config.json"), "the weights hold 2 layers",
         edit_config(lambda d: d["text_config"].update(num_hidden_layers=5))),
    Case("ckpt-config-hidden-a-string", run_torch(model=MODEL), in_model("config.json"), "hidden_size",
         edit_config(lambda d: d["text_config"].update(hidden_size="32"))),
    Case("ckpt-config-kv-heads-not-dividing", run_torch(model=MODEL), in_model("config.json"), "num_key_value_heads",
         edit_config(lambda d: d["text_config"].update(num_key_value_heads=3))),
    Case("ckpt-config-vision-layers-disagree", run_torch(model=MODEL), in_model("config.json"), "vision_config",
         edit_config(lambda d: d["vision_config"].update(num_hidden_layers=9))),
    Case("ckpt-config-image-token-outside", run_torch(model=MODEL), in_model("config.json"), "image_token_id",
         edit_config(lambda d: d.update(image_token_id=10**6))),
    Case("ckpt-config-nested-deeply", run_torch(model=MODEL), in_model("config.json"), "nested too deeply",
         deep_json("config.json", folder="model")),
    Case("ckpt-tokenizer-config-nested-deeply", run_torch(model=MODEL), in_model("tokenizer_config.json"), "nested too deeply",
         deep_json("tokenizer_config.json", folder="model")),
    Case("ckpt-config-rope-dynamic", run_torch(model=MODEL), in_model("config.json"), "dynamic",
         edit_config(lambda d: d["text_config"].update(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0}))),
    Case("export-config-rope-dynamic", lambda c: ["export", "--model", c.tmp / "model", "--out", c.tmp / "out"],
         in_model("config.json"), "dynamic", edit_config(lambda d: d["text_config"].update(
             rope_scaling={"type": "dynamic", "factor": 2.0}))),
    # ---- preprocessing: ranges, and the transformers 5 layout
    Case("ckpt-tokenizer-ids-past-vocab", run_torch(model=MODEL), in_model("tokenizer.json"), "vocab_size",
         lambda c: tokenizer_ids_past_table(c, folder="model")),
    Case("ckpt-crop-size-100000", run_torch(model=MODEL), in_model("preprocessor_config.json"), "crop_size",
         lambda c: edit_json(copy_model(c) / "preprocessor_config.json", lambda d: d.update(crop_size={"height": 100000,
                                                                                                      "width": 100000}))),
    Case("ckpt-transformers5-processor-config", run_torch(model=MODEL), None, setup=transformers5_processor),
    Case("ckpt-no-preprocessor-at-all", run_torch(model=MODEL), in_model("preprocessor_config.json"), "no such file",
         lambda c: (copy_model(c) / "preprocessor_config.json").unlink()),
    # ---- command-line values, every command, at parse time
    Case("train-minutes-nan", lambda c: ["train", "--out", c.tmp / "m", "--minutes", "nan"], "--minutes", "nan"),
    Case("train-batch-size-zero", lambda c: ["train", "--out", c.tmp / "m", "--batch-size", "0"], "--batch-size", ">= 1"),
    Case("train-vision-share-two", lambda c: ["train", "--out", c.tmp / "m", "--vision-share", "2"], "--vision-share", "[0, 1]"),
    Case("train-eval-every-negative", lambda c: ["train", "--out", c.tmp / "m", "--eval-every", "-1"], "--eval-every", "> 0"),
    Case("heavy-budget-past-64-bits", run_bundle("--heavy-budget", str(2**64)), "--heavy-budget", "below"),
    Case("recent-budget-past-64-bits", run_bundle("--recent-budget", str(2**63)), "--recent-budget", "below"),
    Case("k-min-past-64-bits", run_bundle("--k-min", str(2**70)), "--k-min", "below"),
    Case("seed-past-64-bits", run_bundle("--seed", str(2**64 + 1), "--temperature", "1"), "--seed", "below"),
    Case("temperature-subnormal", run_bundle("--temperature", "1e-310"), "--temperature", "1e-310"),
    Case("temperature-small-works", run_bundle("--temperature", "0.01", "--seed", str(2**63 - 1)), None),
    Case("prompt-not-utf8", run_bundle(prompt=os.fsdecode(b"what \xff\xfe is it ?")), "--prompt", "UTF-8"),
    Case("threads-huge", run_bundle("--threads", str(2**40)), "--threads", "below"),
    Case("bench-out-is-a-file", lambda c: ["bench", "--quick", "--out", c.image], "--out", "is a file"),
    Case("quantize-report-out-is-a-file", lambda c: ["quantize", "--bundle", c.bundle, "--report", "--out", c.image], "--out",
         "is a file"),
    Case("export-threshold-nan", lambda c: ["export", "--model", c.model, "--out", c.tmp / "o", "--external-data-threshold-mb",
                                            "nan"], "--external-data-threshold-mb", "nan"),
    # ---- images: the header's size before any pixel is decoded, Pillow's warnings one line
    Case("image-ico-with-huge-png", run_bundle(image=tmp_file("icon.ico")), lambda c: str(c.tmp / "icon.ico"), "image",
         ico_with_huge_png),
]


@pytest.fixture(scope="module")
def shared(tiny_llava_dir, tiny_bundle, tiny_image):
    return SimpleNamespace(model=Path(tiny_llava_dir), bundle=Path(tiny_bundle), image=Path(tiny_image))


def check_case(case: Case, c) -> None:
    if case.setup is not None:
        case.setup(c)
    argv = case.argv(c)
    roots = (c.tmp, c.model, c.bundle, c.image)
    before = snapshot(*roots)
    p = run_cli(argv)
    after = snapshot(*roots)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if case.where is None:
        assert p.returncode == 0, p.stderr[-3000:]
        json.loads(p.stdout)
    else:
        where = case.where(c) if callable(case.where) else case.where
        assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and p.stderr.endswith("\n"), p.stderr
        assert lines[0].startswith(f"vtprune: error: {where}: "), lines[0]
        assert case.says in lines[0], lines[0]
        assert "the secret" not in p.stdout + p.stderr
    assert after == before, "files were added, removed or changed: " + str(set(after.items()) ^ set(before.items()))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_round2(case: Case, shared, tmp_path):
    check_case(case, SimpleNamespace(tmp=tmp_path, **vars(shared)))
