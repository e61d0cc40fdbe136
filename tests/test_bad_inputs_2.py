"""Round 2 of the bad-input corpus (issue 20): manifests that reach outside the bundle or disagree with its files,
model folders whose headers or configs lie, images whose headers lie, command-line values out of range.

Same contract as tests/test_bad_inputs.py, whose helpers these cases reuse: exit 0, or exit 2 with one line
`vtprune: error: <where>: ...` naming the file or option, no traceback, nothing added, removed or changed.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_bad_inputs import (Case, copy_bundle, copy_model, edit_json, run_bundle, run_cli, run_torch, sha256,
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


def tokenizer_ids_past_table(c):
    b = copy_bundle(c)
    edit_json(b / "tokenizer.json", lambda d: d["added_tokens"].append(
        {"id": 4000, "content": "<far>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}))


def deep_json(name: str, folder: str = "bundle"):
    def setup(c):
        root = copy_bundle(c) if folder == "bundle" else copy_model(c)
        (root / name).write_text("[" * 200_000 + "]" * 200_000)
    return setup


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
