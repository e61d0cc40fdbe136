"""A fuzzer over the four file kinds a user hands vtprune (issue 20): mutations of manifest.json, config.json,
safetensors headers and image headers, each fed through the code the CLI runs on it. Every mutation must end in
success or in one `UserError` (the CLI's exit 2 with one line), never another exception (a traceback), and nothing
may be written next to the input (no partial file).

What runs per kind, in-process (a process per mutation would be ~1 s each):
  manifest.json   Bundle.open and Pipeline (sessions reused: the graphs are not what is mutated), sample lookup;
  config.json     ModelFolder (config checks, headers, config against the weights), ModelShape (plan, roofline);
  safetensors     CheckpointWeights.open; when it accepts, safetensors itself must read every tensor;
  image headers   load_image and preprocess on PNG, JPEG, GIF, BMP, TIFF, WEBP files with bytes of the header
                  replaced (sizes set huge or zero, flags flipped).
A few hundred per kind in the default run; 2,000 per kind under `-m slow`.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vtprune.errors import UserError

DEFAULT_N = 400
SLOW_N = 2000
OUTCOMES: dict[str, Counter] = {}

# ------------------------------------------------------------------------------------- JSON mutations

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**12, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-310, 5.0, 0.5, 1e308]),
    st.text(max_size=12), st.sampled_from(["", "../secret.txt", "/etc/passwd", "a/../../b", "x\\..\\y", "fp32", "vision.onnx",
                                           "dynamic", "llama", "F16", "Q4", "0" * 64]),
)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                                max_size=3), max_leaves=6)


def paths(value, prefix=()):
    """Every path into a JSON tree (the root included)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated_json(draw, original):
    """The original tree with 1-3 edits: a node replaced by another JSON value, deleted, or given an extra key."""
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        all_paths = list(paths(data))
        path = draw(st.sampled_from(all_paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            if action == "replace":
                data = draw(JSON_VALUES)
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            parent[key] = draw(JSON_VALUES)
    return data


def dumps(data) -> str:
    return json.dumps(data)  # NaN and Infinity as Python writes them (json.loads reads them back)


def record(kind: str, outcome: str) -> None:
    OUTCOMES.setdefault(kind, Counter())[outcome] += 1


def one_line(e: UserError) -> None:
    assert "\n" not in str(e) and e.where and e.what, repr(str(e))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def runs(kind: str, fn) -> None:
    """fn() must return or raise UserError (one line); anything else fails the example."""
    try:
        fn()
    except UserError as e:
        one_line(e)
        record(kind, "exit 2")
    else:
        record(kind, "success")


def report(kind: str) -> None:
    counts = OUTCOMES.pop(kind, Counter())
    print(f"\nfuzz {kind}: {sum(counts.values())} mutations, {dict(counts)}, 0 tracebacks")


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------- manifest


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tiny_image, tmp_path_factory):
    root = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("fuzz") / "bundle"))
    shutil.copyfile(tiny_image, root / "sample.png")
    (root / "sample_question.txt").write_text("what is in the image ?")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sample"] = {"image": "sample.png", "question": "sample_question.txt"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, manifest


def manifest_case(fuzz_bundle, monkeypatch, n):
    import vtprune.runtime.generate as generate
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.session import open_session

    root, original = fuzz_bundle
    sessions = {}

    def cached(path, *args, **kwargs):  # the graphs are not mutated: open each once
        key = Path(path).resolve()
        if key not in sessions:
            sessions[key] = open_session(path, "cpu", 1, {})
        return sessions[key]

    monkeypatch.setattr(generate, "open_session", cached)
    before = listing(root)

    @fuzz(n)
    @given(mutated_json(original))
    def case(data):
        (root / "manifest.json").write_text(dumps(data))

        def use():
            bundle = Bundle.open(root)
            bundle.sample()
            pipe = generate.Pipeline(bundle, "fp32", "cpu")
            pipe.tokenizer.build("what is in the image ?", pipe.template)
            pipe.empty_cache()

        runs("manifest.json", use)
        assert listing(root) == before

    try:
        case()
    finally:
        (root / "manifest.json").write_text(json.dumps(original))
    report("manifest.json")


def test_fuzz_manifest(fuzz_bundle, monkeypatch):
    manifest_case(fuzz_bundle, monkeypatch, DEFAULT_N)


@pytest.mark.slow
def test_fuzz_manifest_slow(fuzz_bundle, monkeypatch):
    manifest_case(fuzz_bundle, monkeypatch, SLOW_N)


# ---------------------------------------------------------------------------------------------- config.json


@pytest.fixture(scope="module")
def fuzz_model(tiny_llava_dir, tmp_path_factory):
    root = Path(shutil.copytree(tiny_llava_dir, tmp_path_factory.mktemp("fuzz") / "model"))
    return root, json.loads((root / "config.json").read_text())


def config_case(fuzz_model, n):
    from vtprune.models.loading import ModelFolder
    from vtprune.models.shapes import ModelShape

    root, original = fuzz_model
    before = listing(root)

    @fuzz(n)
    @given(mutated_json(original))
    def case(data):
        (root / "config.json").write_text(dumps(data))

        def use():
            folder = ModelFolder(root)
            ModelShape.from_config(folder.config, name=str(root / "config.json")).params()

        runs("config.json", use)
        assert listing(root) == before

    try:
        case()
    finally:
        (root / "config.json").write_text(json.dumps(original))
    report("config.json")


def test_fuzz_config(fuzz_model):
    config_case(fuzz_model, DEFAULT_N)


@pytest.mark.slow
def test_fuzz_config_slow(fuzz_model):
    config_case(fuzz_model, SLOW_N)


# ---------------------------------------------------------------------------------------------- safetensors


def header_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


class Blob(bytes):
    """File bytes whose repr stays short in a falsifying example (the header, not a megabyte of weights)."""

    def __repr__(self) -> str:
        return f"Blob({bytes(self[:400])!r}... {len(self)} bytes)"


@st.composite
def mutated_safetensors(draw, header, body):
    """A header mutated as JSON (then re-encoded with its length), or raw bytes of the first 8 + 64 replaced."""
    if draw(st.booleans()):
        text = dumps(draw(mutated_json(header))).encode()
        return Blob(len(text).to_bytes(8, "little") + text + body)
    text = json.dumps(header).encode()
    raw = bytearray(len(text).to_bytes(8, "little") + text + body)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, min(len(raw) - 1, 8 + 64)))
        raw[i] = draw(st.integers(0, 255))
    return Blob(raw)


def safetensors_case(fuzz_model, n):
    from safetensors import safe_open

    from vtprune.models.weights import CheckpointWeights

    root, _ = fuzz_model
    path = root / "model.safetensors"
    original = path.read_bytes()
    header, body = header_parts(path)
    before = listing(root)

    @fuzz(n)
    @given(mutated_safetensors(header, body))
    def case(data):
        path.write_bytes(data)

        def use():
            weights = CheckpointWeights.open(root)
            with safe_open(str(path), framework="numpy") as f:  # what vtprune accepted, safetensors must read
                for name in f.keys():
                    if weights.tensors[next(k for k, t in weights.tensors.items() if t.stored_name == name)].dtype != "BF16":
                        f.get_tensor(name)

        runs("safetensors header", use)
        assert listing(root) == before

    try:
        case()
    finally:
        path.write_bytes(original)
    report("safetensors header")


def test_fuzz_safetensors_header(fuzz_model):
    safetensors_case(fuzz_model, DEFAULT_N)


@pytest.mark.slow
def test_fuzz_safetensors_header_slow(fuzz_model):
    safetensors_case(fuzz_model, SLOW_N)


# ---------------------------------------------------------------------------------------------- image headers


def image_bytes(fmt: str) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P" if fmt == "GIF" else "RGB").save(buf, format=fmt)
    return buf.getvalue()


FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO")
BIG = [b"\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00", b"\x00\x01\x00\x00", b"\xff\xff\xff\xff"]


@st.composite
def mutated_image(draw):
    """A small image file with 1-4 edits in its first 64 bytes: a byte replaced, or a field set to a huge/zero size."""
    fmt = draw(st.sampled_from(FORMATS))
    raw = bytearray(image_bytes(fmt))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, min(63, len(raw) - 1)))
        if draw(st.booleans()):
            raw[i] = draw(st.integers(0, 255))
        else:
            patch = draw(st.sampled_from(BIG))
            raw[i : i + len(patch)] = patch
    return fmt, bytes(raw)


def image_case(tmp_path_factory, n):
    from vtprune.models.preprocess import PreprocessConfig, load_image, preprocess

    folder = tmp_path_factory.mktemp("fuzz-images")
    config = PreprocessConfig()

    @fuzz(n)
    @given(mutated_image())
    def case(item):
        fmt, data = item
        path = folder / f"image.{fmt.lower()}"
        path.write_bytes(data)

        def use():
            pixels = preprocess(load_image(path), config)
            assert pixels.shape == (1, 3, 224, 224) and np.isfinite(pixels).all()

        runs("image header", use)
        path.unlink()
        assert not any(folder.iterdir())

    case()
    report("image header")


def test_fuzz_image_headers(tmp_path_factory):
    image_case(tmp_path_factory, DEFAULT_N)


@pytest.mark.slow
def test_fuzz_image_headers_slow(tmp_path_factory):
    image_case(tmp_path_factory, SLOW_N)


def test_the_fuzzer_mutates():
    """The mutation strategies change what they are given (a fuzzer that returns its input would test nothing)."""
    original = {"a": {"b": [1, 2]}, "c": "x"}
    seen = []

    @settings(max_examples=30, database=None, derandomize=True)
    @given(mutated_json(original))
    def case(data):
        seen.append(data != original)

    case()
    assert sum(seen) >= 20, sum(seen)
