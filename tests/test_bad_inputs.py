"""A bad-input corpus, generated here in temporary folders, each case run through the real CLI.

Every case either works (exit 0) or fails the way design.md promises: exit code 2 and exactly one stderr
line `vtprune: error: <file or option>: ...` naming the right file or option, no traceback; and in both
cases no partial file or folder is left behind and the input files are byte-for-byte untouched (every
file under the case folder and the shared fixtures is hashed before and after).

Checks come before any model load, so most cases run in about a second; the few that need the weights
(a tensor's shape, the image token id) or must work on the torch reference load the tiny model (~6 s).
Read-only folders are made read-only for root too by dropping CAP_DAC_OVERRIDE (setpriv); a full disk
is simulated inside the real CLI process (no small filesystem can be mounted here).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from PIL import Image

RUN = ["--max-new-tokens", "2", "--json"]
QUESTION = "what is in the image ?"
# Root ignores file permissions; without these capabilities a read-only folder is read-only for it too.
DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


# ------------------------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under the roots: a file's sha256, a link's target, a folder's presence."""
    entries = {}
    for root in roots:
        entries[str(root)] = "dir" if root.is_dir() else sha256(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                entries[str(p)] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else sha256(p)
    return entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(argv: list, drop_dac: bool = False) -> subprocess.CompletedProcess:
    prefix = DROP_DAC if drop_dac and os.geteuid() == 0 else []
    cmd = [*prefix, sys.executable, "-m", "vtprune.cli", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def copy_model(c, name: str = "model") -> Path:
    return Path(shutil.copytree(c.model, c.tmp / name))


def copy_bundle(c, name: str = "bundle") -> Path:
    return Path(shutil.copytree(c.bundle, c.tmp / name))


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, nor lie about the size in the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pixels(seed: int = 0, size: int = 64, channels: int = 3, dtype=np.uint8, high: int = 256) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


# ------------------------------------------------------------------------------------- the inputs


def truncated_safetensors(c):
    m = copy_model(c)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def corrupt_safetensors(c):
    m = copy_model(c)
    (m / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))


def lying_safetensors_header(c):
    """A header declaring a huge JSON length (2**62): must not be read into memory."""
    m = copy_model(c)
    f = m / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:])


def garbage_safetensors_header(c):
    m = copy_model(c)
    f = m / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def wrong_shape_tensor(c):
    """A well-formed file whose lm_head has the wrong shape for config.json."""
    from safetensors.numpy import load_file, save_file

    m = copy_model(c)
    tensors = load_file(m / "model.safetensors")
    key = next(k for k in tensors if "lm_head" in k)
    tensors[key] = np.zeros((3, 5), np.float32)
    save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})


def sharded(c, name: str = "model") -> Path:
    """The tiny checkpoint split into two shards with an index, as save_pretrained writes large models."""
    from safetensors.numpy import load_file, save_file

    m = copy_model(c, name)
    tensors = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in halves.items():
        save_file({k: tensors[k] for k in names}, m / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in names})
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return m


def missing_shard(c):
    (sharded(c) / "model-00002-of-00002.safetensors").unlink()


def index_names_missing_file(c):
    m = sharded(c)
    edit_json(m / "model.safetensors.index.json", lambda d: d["weight_map"].update({"extra.weight": "model-extra.safetensors"}))


def index_names_outside_file(c):
    m = sharded(c)
    shutil.copyfile(m / "model-00001-of-00002.safetensors", c.tmp / "outside.safetensors")
    edit_json(m / "model.safetensors.index.json", lambda d: d["weight_map"].update({"extra.weight": "../outside.safetensors"}))


def index_not_json(c):
    (sharded(c) / "model.safetensors.index.json").write_text("{not json")


def config_without_text_config(c):
    edit_json(copy_model(c) / "config.json", lambda d: d.pop("text_config"))


def config_without_hidden_size(c):
    """A text_config without hidden_size: transformers would fill in Llama-7B's 4096 and build a 7B model."""
    edit_json(copy_model(c) / "config.json", lambda d: d["text_config"].pop("hidden_size"))


def config_other_model_type(c):
    edit_json(copy_model(c) / "config.json", lambda d: d.update(model_type="llama"))


def config_other_text_model(c):
    edit_json(copy_model(c) / "config.json", lambda d: d["text_config"].update(model_type="gpt2"))


def config_not_json(c):
    (copy_model(c) / "config.json").write_text('{"model_type": "llava",')


def config_missing(c):
    (copy_model(c) / "config.json").unlink()


def pickle_only(c):
    m = copy_model(c)
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle: never loaded")


def tokenizer_missing(c):
    (copy_model(c) / "tokenizer.json").unlink()


def image_token_id_differs(c):
    edit_json(copy_model(c) / "config.json", lambda d: d.update(image_token_id=5, image_token_index=5))


def write_image(name: str, make: Callable[[], Image.Image], **save) -> Callable:
    def setup(c):
        make().save(c.tmp / name, **save)

    setup.__name__ = f"image_{name}"
    return setup


def write_bytes(name: str, data: Callable[[], bytes]) -> Callable:
    def setup(c):
        (c.tmp / name).write_bytes(data())

    return setup


def truncated(name: str, make: Callable[[], Image.Image], **save) -> Callable:
    def setup(c):
        make().save(c.tmp / name, **save)
        data = (c.tmp / name).read_bytes()
        (c.tmp / name).write_bytes(data[: len(data) // 2])

    return setup


def rgba():
    return Image.fromarray(pixels(1, channels=4))


def palette_transparent():
    im = Image.fromarray(pixels(2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 0
    return im


def float_image(bad: float | None):
    a = pixels(3, channels=1).astype(np.float32)
    if bad is not None:
        a[5, 5] = bad
    return Image.fromarray(a)


def rgb48() -> bytes:
    rows = pixels(4, size=40, channels=3, dtype=">u2", high=65536).reshape(40, -1).tobytes()
    raw = b"".join(b"\x00" + rows[i * 240 : (i + 1) * 240] for i in range(40))  # filter byte + 40 x 3 x 2 bytes
    return png_bytes(40, 40, 16, 2, raw)


def bomb(side: int) -> Callable[[], bytes]:
    """A PNG whose header declares side x side grey pixels, with one short row of data (never decoded)."""
    return lambda: png_bytes(side, side, 8, 0, b"\x00" * 64)


def bundle_truncated_graph(c):
    f = copy_bundle(c) / "decoder.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def bundle_tampered_graph(c):
    f = copy_bundle(c) / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\x00" * 16
    f.write_bytes(bytes(data))


def _rehash(b: Path, graph: str, file: str) -> None:
    edit_json(b / "manifest.json", lambda d: d["graphs"][graph]["fp32"]["sha256"].update({file: sha256(b / file)}))


def bundle_truncated_graph_rehashed(c):
    """Truncated, and the manifest's checksum updated to match: ONNX Runtime must refuse it."""
    b = copy_bundle(c)
    f = b / "decoder.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _rehash(b, "decoder", "decoder.onnx")


def bundle_unknown_op_rehashed(c):
    """A well-formed graph whose first node is an op no runtime knows, checksum updated."""
    import onnx

    b = copy_bundle(c)
    model = onnx.load(b / "vision.onnx")
    model.graph.node[0].op_type = "NotAnOp"
    onnx.save(model, b / "vision.onnx")
    _rehash(b, "vision", "vision.onnx")


def bundle_external_data_outside(c, symlink: bool = False):
    """vision.onnx rewritten to keep its weights in `secret.bin` outside the bundle (by a `..` location, or through
    a link inside it), checksum updated: a bundle is not trusted to point the runtime at other files."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    b = copy_bundle(c)
    model = onnx.load(b / "vision.onnx")
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="secret.bin", size_threshold=1024)
    onnx.save_model(model, b / "vision.onnx")
    shutil.move(b / "secret.bin", c.tmp / "secret.bin")
    if symlink:
        (b / "secret.bin").symlink_to(c.tmp / "secret.bin")
    else:  # onnx refuses to write a `..` location, so it is set in the protobuf directly
        model = onnx.load(b / "vision.onnx", load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                entry.value = "../secret.bin" if entry.key == "location" else entry.value
        (b / "vision.onnx").write_bytes(model.SerializeToString())
    _rehash(b, "vision", "vision.onnx")


def bundle_wrong_checksum(c):
    b = copy_bundle(c)
    edit_json(b / "manifest.json", lambda d: d["graphs"]["decoder"]["fp32"]["sha256"].update({"decoder.onnx": "0" * 64}))


def bundle_graph_outside(c):
    b = copy_bundle(c)
    shutil.copyfile(b / "decoder.onnx", c.tmp / "outside.onnx")

    def edit(d):
        entry = d["graphs"]["decoder"]["fp32"]
        entry["file"] = "../outside.onnx"
        entry["sha256"] = {"../outside.onnx": sha256(c.tmp / "outside.onnx")}

    edit_json(b / "manifest.json", edit)


def bundle_absolute_tokenizer(c):
    b = copy_bundle(c)
    shutil.copyfile(b / "tokenizer.json", c.tmp / "tokenizer.json")
    edit_json(b / "manifest.json", lambda d: d["tokenizer"].update(file=str(c.tmp / "tokenizer.json")))


def bundle_symlink_out(c):
    b = copy_bundle(c)
    shutil.move(b / "embed_tokens.npy", c.tmp / "embed_tokens.npy")
    (b / "embed_tokens.npy").symlink_to(c.tmp / "embed_tokens.npy")


def bundle_newer_format(c):
    edit_json(copy_bundle(c) / "manifest.json", lambda d: d.update(format_version=99))


def bundle_format_as_string(c):
    edit_json(copy_bundle(c) / "manifest.json", lambda d: d.update(format_version="1"))


def bundle_manifest_not_json(c):
    (copy_bundle(c) / "manifest.json").write_text("[1, 2")


def bundle_manifest_missing(c):
    (copy_bundle(c) / "manifest.json").unlink()


def bundle_without_decoder(c):
    edit_json(copy_bundle(c) / "manifest.json", lambda d: d["graphs"].pop("decoder"))


def bundle_model_without_layers(c):
    edit_json(copy_bundle(c) / "manifest.json", lambda d: d["model"].pop("num_layers"))


def bundle_pickled_embeddings(c):
    """embed_tokens.npy replaced by an object array (a pickle inside .npy), checksum updated: never unpickled."""
    b = copy_bundle(c)
    np.save(b / "embed_tokens.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    edit_json(b / "manifest.json", lambda d: d["embed_tokens"].update(sha256=sha256(b / "embed_tokens.npy")))


def bundle_embeddings_wrong_shape(c):
    b = copy_bundle(c)
    np.save(b / "embed_tokens.npy", np.zeros((128, 7), np.float32))
    edit_json(b / "manifest.json", lambda d: d["embed_tokens"].update(sha256=sha256(b / "embed_tokens.npy")))


def bundle_corrupt_tokenizer(c):
    (copy_bundle(c) / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')


def bundle_zero_std(c):
    edit_json(copy_bundle(c) / "preprocessor_config.json", lambda d: d.update(image_std=[0.2, 0.0, 0.2]))


def out_exists(c):
    (c.tmp / "out").mkdir()


def out_is_file(c):
    (c.tmp / "out").write_text("a file")


def read_only_parent(c):
    (c.tmp / "ro").mkdir()
    (c.tmp / "ro").chmod(0o555)


def read_only_bundle(c):
    shutil.copytree(c.bundle, c.tmp / "ro")
    (c.tmp / "ro").chmod(0o555)


def bad_plan_config(c):
    m = c.tmp / "model"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
                                               "text_config": {"model_type": "llama", "hidden_size": -4}}))


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable  # c -> argv (without the leading `python -m vtprune.cli`)
    where: Callable | str | None  # None: must work (exit 0); else the `<where>` of the one error line
    says: str = ""  # a phrase the error must contain
    setup: Callable | None = None
    drop_dac: bool = False


def run_torch(*extra, model=None, image=None, prompt=QUESTION):
    return lambda c: ["run", "--model", model(c) if model else c.tmp / "model", "--image", image(c) if image else c.image,
                      "--prompt", prompt, *RUN, *extra]


def run_bundle(*extra, bundle=None, image=None, prompt=QUESTION):
    return lambda c: ["run", "--bundle", bundle(c) if bundle else c.bundle, "--image", image(c) if image else c.image,
                      "--prompt", prompt, *RUN, *extra]


def tmp_file(name: str) -> Callable:
    return lambda c: c.tmp / name


def in_model(name: str) -> Callable:
    return lambda c: str(c.tmp / "model" / name)


def in_tmp(name: str) -> Callable:
    return lambda c: str(c.tmp / name)


def in_bundle(name: str) -> Callable:
    return lambda c: str((c.tmp / "bundle" / name).resolve())


def image_case(name: str, setup: Callable, where: bool | str = True, says: str = "") -> Case:
    """An image through the bundle backend: where=True -> the image file is named, None -> it works."""
    return Case(f"image-{name}", run_bundle(image=tmp_file(name)), (lambda c: str(c.tmp / name)) if where is True else where,
                says, setup)


LONG_PROMPT = " ".join(["what"] * 600) + " ?"
SHARED_MODEL = lambda c: c.model  # noqa: E731

CASES = [
    # ---- checkpoints (torch backend): all refused before a weight is read
    Case("ckpt-truncated-safetensors", run_torch(), in_model("model.safetensors"), "truncated", truncated_safetensors),
    Case("ckpt-corrupt-safetensors", run_torch(), in_model("model.safetensors"), "safetensors", corrupt_safetensors),
    Case("ckpt-huge-header-length", run_torch(), in_model("model.safetensors"), "header", lying_safetensors_header),
    Case("ckpt-garbage-header", run_torch(), in_model("model.safetensors"), "safetensors", garbage_safetensors_header),
    Case("ckpt-tensor-of-wrong-shape", run_torch(), in_model("model.safetensors"), "shape", wrong_shape_tensor),
    Case("ckpt-missing-shard", run_torch(), in_model("model.safetensors.index.json"), "missing", missing_shard),
    Case("ckpt-index-names-missing-file", run_torch(), in_model("model.safetensors.index.json"), "model-extra",
         index_names_missing_file),
    Case("ckpt-index-names-outside-file", run_torch(), in_model("model.safetensors.index.json"), "outside",
         index_names_outside_file),
    Case("ckpt-index-not-json", run_torch(), in_model("model.safetensors.index.json"), "index", index_not_json),
    Case("ckpt-config-without-text-config", run_torch(), in_model("config.json"), "text_config", config_without_text_config),
    Case("ckpt-config-without-hidden-size", run_torch(), in_model("model.safetensors"), "config.json needs",
         config_without_hidden_size),
    Case("ckpt-config-other-model-type", run_torch(), in_model("config.json"), "llava", config_other_model_type),
    Case("ckpt-config-other-text-model", run_torch(), in_model("config.json"), "gpt2", config_other_text_model),
    Case("ckpt-config-not-json", run_torch(), in_model("config.json"), "JSON", config_not_json),
    Case("ckpt-config-missing", run_torch(), in_model("config.json"), "missing", config_missing),
    Case("ckpt-pickle-only", run_torch(), lambda c: str(c.tmp / "model"), "pickle", pickle_only),
    Case("ckpt-no-such-folder", run_torch(model=tmp_file("nope")), lambda c: str(c.tmp / "nope"), "no such folder"),
    Case("ckpt-tokenizer-missing", run_torch(), in_model("tokenizer.json"), "no such file", tokenizer_missing),
    Case("ckpt-preprocessor-missing", run_torch(), in_model("preprocessor_config.json"), "no such file",
         lambda c: (copy_model(c) / "preprocessor_config.json").unlink()),
    Case("ckpt-tokenizer-corrupt", run_torch(), in_model("tokenizer.json"), "tokenizer",
         lambda c: (copy_model(c) / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')),
    Case("ckpt-image-token-id-differs", run_torch(), in_model("tokenizer.json"), "image_token_id", image_token_id_differs),
    # ---- images (bundle backend, torch-free and fast); the decoding is the same code for both backends
    image_case("empty.png", write_bytes("empty.png", lambda: b""), says="empty"),
    image_case("text.png", write_bytes("text.png", lambda: b"this is not an image\n" * 10), says="recognise"),
    image_case("truncated.png", truncated("truncated.png", lambda: Image.fromarray(pixels(5, size=256))), says="decode"),
    image_case("truncated.jpg", truncated("truncated.jpg", lambda: Image.fromarray(pixels(6, size=256)), format="JPEG"),
               says="decode"),
    image_case("bomb-10k.png", write_bytes("bomb-10k.png", bomb(10_000)), says="decompression bomb"),
    image_case("bomb-100k.png", write_bytes("bomb-100k.png", bomb(100_000)), says="refused before decoding"),
    image_case("one-row-60M.png", write_bytes("one-row-60M.png", lambda: png_bytes(60_000_000, 1, 8, 0, bytes(60_000_001))),
               says="pixels"),
    image_case("one-row-8k.png", write_bytes("one-row-8k.png", lambda: png_bytes(8192, 1, 8, 0, bytes(8193))), says="pixels"),
    image_case("nan.tiff", write_image("nan.tiff", lambda: float_image(float("nan"))), says="NaN"),
    image_case("inf.tiff", write_image("inf.tiff", lambda: float_image(float("inf"))), says="Inf"),
    Case("image-special-file", run_bundle(image=lambda c: "/dev/zero"), "/dev/zero", "special file"),
    Case("image-missing", run_bundle(image=tmp_file("nope.png")), lambda c: str(c.tmp / "nope.png"), "no such file"),
    Case("image-is-a-folder", run_bundle(image=lambda c: c.tmp), lambda c: str(c.tmp), "directory"),
    image_case("gray.png", write_image("gray.png", lambda: Image.fromarray(pixels(7, channels=1))), where=None),
    image_case("rgba.png", write_image("rgba.png", rgba), where=None),
    image_case("la.png", write_image("la.png", lambda: rgba().convert("LA")), where=None),
    image_case("palette-transparent.png", write_image("palette-transparent.png", palette_transparent), where=None),
    image_case("bilevel.png", write_image("bilevel.png", lambda: Image.fromarray(pixels(8)).convert("1")), where=None),
    image_case("cmyk.jpg", write_image("cmyk.jpg", lambda: Image.fromarray(pixels(9)).convert("CMYK"), format="JPEG"), where=None),
    image_case("gray16.png", write_image("gray16.png", lambda: Image.fromarray(pixels(10, channels=1, dtype=np.uint16, high=65536))),
               where=None),
    image_case("rgb48.png", write_bytes("rgb48.png", rgb48), where=None),
    image_case("float.tiff", write_image("float.tiff", lambda: float_image(None)), where=None),
    image_case("one-pixel.png", write_image("one-pixel.png", lambda: Image.new("RGB", (1, 1), (200, 10, 10))), where=None),
    image_case("exif-rotated.jpg", write_image("exif-rotated.jpg", lambda: Image.fromarray(pixels(11, size=80)), format="JPEG",
                                               exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"),
               where=None),
    image_case("gif-animated.gif", write_image("gif-animated.gif", lambda: Image.fromarray(pixels(12)).convert("P"), format="GIF",
                                               save_all=True, append_images=[Image.fromarray(pixels(13)).convert("P")]),
               where=None),
    # ---- prompts
    Case("prompt-without-image-token", run_bundle(prompt="what is red ?"), None),
    Case("prompt-with-image-token-inside", run_bundle(prompt="what is <image> red ?"), None),
    Case("prompt-full-template", run_bundle(prompt="USER: <image>\nwhat is red ? ASSISTANT:"), None),
    Case("prompt-unknown-words-and-emoji", run_bundle(prompt="qu'est-ce que c'est 🐱 ?"), None),
    Case("prompt-two-image-tokens", run_bundle(prompt="<image> and <image> ?"), "--prompt", "at most one"),
    Case("prompt-empty", run_bundle(prompt="  "), "--prompt", "empty"),
    Case("prompt-longer-than-context", run_bundle(prompt=LONG_PROMPT), "--prompt", "context"),
    Case("max-new-tokens-past-context", run_bundle("--max-new-tokens", "100000"), "--max-new-tokens", "context"),
    Case("max-new-tokens-zero", run_bundle("--max-new-tokens", "0"), "--max-new-tokens", ">= 1"),
    # ---- budgets, ratios, α, sampling (bundle backend; the torch backend shares the checks, see the torch cases)
    Case("budget-zero-both", run_bundle("--heavy-budget", "0", "--recent-budget", "0"), "--heavy-budget", "at least one"),
    Case("budget-negative", run_bundle("--heavy-budget", "-3"), "--heavy-budget", ">= 0"),
    Case("budget-recent-negative", run_bundle("--recent-budget", "-1"), "--recent-budget", ">= 0"),
    Case("budget-above-length", run_bundle("--heavy-budget", "5000", "--recent-budget", "5000"), None),
    Case("budget-heavy-zero", run_bundle("--heavy-budget", "0"), None),
    Case("budget-recent-zero", run_bundle("--heavy-budget", "4", "--recent-budget", "0"), None),
    Case("budget-one-token", run_bundle("--heavy-budget", "0", "--recent-budget", "1"), None),
    Case("budget-not-an-int", run_bundle("--heavy-budget", "3.5"), "--heavy-budget", "invalid"),
    Case("ratios-both-zero", run_bundle("--heavy-ratio", "0", "--recent-ratio", "0"), "--heavy-ratio", "empty"),
    Case("ratio-above-one", run_bundle("--heavy-ratio", "1.5"), "--heavy-ratio", "[0, 1]"),
    Case("ratio-negative", run_bundle("--recent-ratio", "-0.1"), "--recent-ratio", "[0, 1]"),
    Case("ratio-nan", run_bundle("--recent-ratio", "nan"), "--recent-ratio", "nan"),
    Case("ratio-inf", run_bundle("--heavy-ratio", "inf"), "--heavy-ratio", "inf"),
    Case("alpha-zero", run_bundle("--alpha", "0"), "--alpha", "(0, 1]"),
    Case("alpha-above-one", run_bundle("--alpha", "1.5"), "--alpha", "(0, 1]"),
    Case("alpha-nan", run_bundle("--alpha", "nan"), "--alpha", "nan"),
    Case("alpha-inf", run_bundle("--alpha", "inf"), "--alpha", "inf"),
    Case("alpha-not-a-number", run_bundle("--alpha", "abc"), "--alpha", "invalid float"),
    Case("k-min-zero", run_bundle("--k-min", "0"), "--k-min", ">= 1"),
    Case("k-min-above-patches", run_bundle("--k-min", "100000"), None),
    Case("prune-layer-zero", run_bundle("--prune-layer", "0"), "--prune-layer", ">= 1"),
    Case("prune-layer-not-exported", run_bundle("--prune-layer", "2"), "--prune-layer", "re-export"),
    Case("temperature-nan", run_bundle("--temperature", "nan"), "--temperature", "nan"),
    Case("temperature-inf", run_bundle("--temperature", "inf"), "--temperature", "inf"),
    Case("temperature-negative", run_bundle("--temperature", "-1"), "--temperature", ">= 0"),
    Case("temperature-sampling", run_bundle("--temperature", "0.7", "--top-p", "0.9"), None),
    Case("top-p-zero", run_bundle("--top-p", "0"), "--top-p", "(0, 1]"),
    Case("top-p-nan", run_bundle("--top-p", "nan"), "--top-p", "nan"),
    Case("seed-negative", run_bundle("--seed", "-1", "--temperature", "1"), "--seed", ">= 0"),
    Case("precision-missing-variant", run_bundle("--precision", "int3"), "--precision", "int3"),
    Case("provider-cuda-absent", run_bundle("--provider", "cuda"), "--provider", "not available"),
    Case("backend-onnx-without-bundle", lambda c: ["run", "--backend", "onnx", "--image", c.image, "--prompt", "what ?"],
         "--backend", "--bundle"),
    Case("unknown-option", run_bundle("--frobnicate", "3"), "--frobnicate", "unrecognized"),
    # ---- bundles
    Case("bundle-truncated-graph", run_bundle(bundle=tmp_file("bundle")), in_bundle("decoder.onnx"), "checksum",
         bundle_truncated_graph),
    Case("bundle-tampered-graph", run_bundle(bundle=tmp_file("bundle")), in_bundle("vision.onnx"), "checksum",
         bundle_tampered_graph),
    Case("bundle-truncated-graph-rehashed", run_bundle(bundle=tmp_file("bundle")), in_bundle("decoder.onnx"),
         "cannot load", bundle_truncated_graph_rehashed),
    Case("bundle-unknown-op-rehashed", run_bundle(bundle=tmp_file("bundle")), in_bundle("vision.onnx"), "cannot load",
         bundle_unknown_op_rehashed),
    Case("bundle-external-data-outside", run_bundle(bundle=tmp_file("bundle")), in_bundle("vision.onnx"), "escapes",
         bundle_external_data_outside),
    Case("bundle-external-data-linked-out", run_bundle(bundle=tmp_file("bundle")), in_bundle("vision.onnx"), "escapes",
         lambda c: bundle_external_data_outside(c, symlink=True)),
    Case("bundle-wrong-checksum", run_bundle(bundle=tmp_file("bundle")), in_bundle("decoder.onnx"), "checksum",
         bundle_wrong_checksum),
    Case("bundle-graph-outside", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "outside the bundle", bundle_graph_outside),
    Case("bundle-absolute-tokenizer-path", run_bundle(bundle=tmp_file("bundle")),
         lambda c: str(c.tmp / "bundle" / "manifest.json"), "outside the bundle", bundle_absolute_tokenizer),
    Case("bundle-symlink-out", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "outside the bundle", bundle_symlink_out),
    Case("bundle-newer-format", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "newer", bundle_newer_format),
    Case("bundle-format-as-string", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "format_version", bundle_format_as_string),
    Case("bundle-manifest-not-json", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "JSON", bundle_manifest_not_json),
    Case("bundle-manifest-missing", run_bundle(bundle=tmp_file("bundle")), lambda c: str(c.tmp / "bundle" / "manifest.json"),
         "missing", bundle_manifest_missing),
    Case("bundle-without-decoder-graph", run_bundle(bundle=tmp_file("bundle")),
         lambda c: str(c.tmp / "bundle" / "manifest.json"), "decoder", bundle_without_decoder),
    Case("bundle-model-without-num-layers", run_bundle(bundle=tmp_file("bundle")),
         lambda c: str(c.tmp / "bundle" / "manifest.json"), "num_layers", bundle_model_without_layers),
    Case("bundle-pickled-embeddings", run_bundle(bundle=tmp_file("bundle")), in_bundle("embed_tokens.npy"), "pickle",
         bundle_pickled_embeddings),
    Case("bundle-embeddings-wrong-shape", run_bundle(bundle=tmp_file("bundle")), in_bundle("embed_tokens.npy"), "shape",
         bundle_embeddings_wrong_shape),
    Case("bundle-corrupt-tokenizer", run_bundle(bundle=tmp_file("bundle")), in_bundle("tokenizer.json"), "tokenizer",
         bundle_corrupt_tokenizer),
    Case("bundle-zero-image-std", run_bundle(bundle=tmp_file("bundle")), in_bundle("preprocessor_config.json"), "image_std",
         bundle_zero_std),
    Case("bundle-no-such-folder", run_bundle(bundle=tmp_file("nope")), lambda c: str(c.tmp / "nope"), "no such folder"),
    Case("bundle-is-a-checkpoint", run_bundle(bundle=SHARED_MODEL), lambda c: str(c.model / "manifest.json"), "missing"),
    # ---- export: refused before any graph is traced, nothing written
    Case("export-out-exists", lambda c: ["export", "--model", c.model, "--out", c.tmp / "out"], "--out", "exists", out_exists),
    Case("export-out-is-a-file", lambda c: ["export", "--model", c.model, "--out", c.tmp / "out"], "--out", "exists",
         out_is_file),
    Case("export-out-parent-missing", lambda c: ["export", "--model", c.model, "--out", c.tmp / "no" / "out"], "--out",
         "does not exist"),
    Case("export-out-parent-read-only", lambda c: ["export", "--model", c.model, "--out", c.tmp / "ro" / "out"], "--out",
         "cannot write", read_only_parent, drop_dac=True),
    Case("export-truncated-checkpoint", lambda c: ["export", "--model", c.tmp / "model", "--out", c.tmp / "out"],
         in_model("model.safetensors"), "truncated", truncated_safetensors),
    Case("export-checkpoint-without-tokenizer", lambda c: ["export", "--model", c.tmp / "model", "--out", c.tmp / "out"],
         in_model("tokenizer.json"), "missing", tokenizer_missing),
    Case("export-opset-too-old", lambda c: ["export", "--model", c.model, "--out", c.tmp / "out", "--opset", "9"],
         "--opset", "18"),
    Case("export-opset-too-new", lambda c: ["export", "--model", c.model, "--out", c.tmp / "out", "--opset", "99"],
         "--opset", "18"),
    Case("export-alpha-nan", lambda c: ["export", "--model", c.model, "--out", c.tmp / "out", "--alpha", "nan"],
         "--alpha", "nan"),
    Case("export-without-out", lambda c: ["export", "--model", c.model], "--out", "required"),
    # ---- plan / roofline (torch-free)
    Case("plan-bad-model-config", lambda c: ["plan", "--model", c.tmp / "model", "--json"], in_model("config.json"),
         "hidden_size", bad_plan_config),
    Case("plan-context-negative", lambda c: ["plan", "--context", "-1", "--json"], "--context", "prompt"),
    Case("plan-memory-nan", lambda c: ["plan", "--memory-gb", "nan", "--json"], "--memory-gb", "positive"),
    Case("plan-heavy-ratio-nan", lambda c: ["plan", "--heavy-ratio", "nan", "--json"], "--heavy-ratio", "nan"),
    Case("plan-recent-ratio-negative", lambda c: ["plan", "--recent-ratio", "-1", "--json"], "--recent-ratio", "[0, 1]"),
    Case("plan-unknown-gpu", lambda c: ["plan", "--gpu", "abacus", "--json"], "--gpu", "abacus"),
    Case("plan-unknown-preset", lambda c: ["plan", "--preset", "gpt-9", "--json"], "--preset", "gpt-9"),
    Case("roofline-visual-tokens-negative", lambda c: ["roofline", "--visual-tokens", "-5", "--json"], "--visual-tokens",
         "-5"),
    Case("roofline-new-tokens-negative", lambda c: ["roofline", "--new-tokens", "-1", "--json"], "--new-tokens", ">= 0"),
    Case("roofline-heavy-ratio-inf", lambda c: ["roofline", "--heavy-ratio", "inf", "--json"], "--heavy-ratio", "inf"),
    Case("roofline-unknown-precision", lambda c: ["roofline", "--precision", "int3", "--json"], "--precision", "int3"),
    Case("roofline-png-read-only", lambda c: ["roofline", "--png", c.tmp / "ro" / "r.png", "--json"], in_tmp("ro/r.png"),
         "cannot write", read_only_parent, drop_dac=True),
    # ---- quantize, eval, demo, bench: their inputs and options
    Case("quantize-no-such-bundle", lambda c: ["quantize", "--bundle", c.tmp / "nope", "--precision", "int8"], in_tmp("nope"),
         "no such folder"),
    Case("quantize-a-checkpoint", lambda c: ["quantize", "--bundle", c.model, "--precision", "int8"],
         lambda c: str(c.model / "manifest.json"), "missing"),
    Case("quantize-unknown-precision", lambda c: ["quantize", "--bundle", c.bundle, "--precision", "int3"], "--precision", "int3"),
    Case("quantize-calibration-negative",
         lambda c: ["quantize", "--bundle", c.bundle, "--precision", "int8-static", "--calibration-samples", "-1"],
         "--calibration-samples", ">= 1"),
    Case("quantize-unknown-graph", lambda c: ["quantize", "--bundle", c.bundle, "--precision", "int8", "--graphs", "audio"],
         "--graphs", "audio"),
    Case("quantize-truncated-graph", lambda c: ["quantize", "--bundle", c.tmp / "bundle", "--precision", "int8"],
         in_bundle("decoder.onnx"), "checksum", bundle_truncated_graph),  # vision first: nothing may be written
    Case("quantize-read-only-bundle", lambda c: ["quantize", "--bundle", c.tmp / "ro", "--precision", "int8"], in_tmp("ro"),
         "cannot write", read_only_bundle, drop_dac=True),
    Case("eval-limit-zero", lambda c: ["eval", "--model", c.model, "--limit", "0"], "--limit", ">= 1"),
    Case("eval-no-such-model", lambda c: ["eval", "--model", c.tmp / "nope"], in_tmp("nope"), "no such folder"),
    Case("eval-baseline-on-a-bundle", lambda c: ["eval", "--bundle", c.bundle, "--method", "topk"], "--method", "PyTorch"),
    Case("eval-tokens-negative", lambda c: ["eval", "--model", c.model, "--method", "topk", "--tokens", "-3"], "--tokens", ">= 1"),
    Case("demo-no-such-model", lambda c: ["demo", "--model", c.tmp / "nope", "--out", c.tmp / "demo"], in_tmp("nope"),
         "no such folder"),
    Case("train-finetune-without-out", lambda c: ["train", "--finetune-pruned"], "--out", "required"),
    Case("train-finetune-init-not-a-checkpoint", lambda c: ["train", "--finetune-pruned", "--out", c.tmp / "ft",
                                                            "--init", c.tmp], "--init", "config.json"),
    Case("train-finetune-alpha-zero", lambda c: ["train", "--finetune-pruned", "--out", c.tmp / "ft", "--alpha", "0"],
         "--alpha", "(0, 1]"),
    Case("train-drop-share-above-one", lambda c: ["train", "--out", c.tmp / "m", "--drop-share", "2"], "--drop-share", "[0, 1]"),
    Case("bench-unknown-preset", lambda c: ["bench", "--preset", "gpt-9", "--out", c.tmp / "results"], "--preset", "gpt-9"),
    Case("bench-repeats-zero", lambda c: ["bench", "--repeats", "0", "--out", c.tmp / "results"], "--repeats", ">= 1"),
    Case("bench-samples-negative", lambda c: ["bench", "--samples", "-1", "--out", c.tmp / "results"], "--samples", ">= 1"),
    Case("bench-new-tokens-zero", lambda c: ["bench", "--new-tokens", "32,0", "--out", c.tmp / "results"], "--new-tokens", "from 1"),
    Case("bench-new-tokens-words", lambda c: ["bench", "--new-tokens", "many", "--out", c.tmp / "results"], "--new-tokens", "integers"),
    # ---- the torch backend on the same options (it shares the checks; these also fail before the model loads)
    Case("torch-prompt-longer-than-context", run_torch(model=SHARED_MODEL, prompt=LONG_PROMPT), "--prompt", "context"),
    Case("torch-prune-layer-too-deep", run_torch("--prune-layer", "9", model=SHARED_MODEL), "--prune-layer", "feature"),
    Case("torch-temperature-inf", run_torch("--temperature", "inf", model=SHARED_MODEL), "--temperature", "inf"),
    Case("torch-seed-negative", run_torch("--seed", "-1", model=SHARED_MODEL), "--seed", ">= 0"),
    Case("torch-truncated-image", run_torch(model=SHARED_MODEL, image=tmp_file("t.png")), lambda c: str(c.tmp / "t.png"),
         "decode", truncated("t.png", lambda: Image.fromarray(pixels(5, size=256)))),
    # ---- these load the torch model (about 8 s each): the image modes that must work, on the reference too
    Case("torch-cmyk-image-no-image-token", run_torch(model=SHARED_MODEL, image=tmp_file("c.jpg"), prompt="what is red ?"),
         None, setup=write_image("c.jpg", lambda: Image.fromarray(pixels(9)).convert("CMYK"), format="JPEG")),
    Case("torch-gray16-budgets-above-length",
         run_torch("--heavy-budget", "900", "--recent-budget", "900", model=SHARED_MODEL, image=tmp_file("g.png")), None,
         setup=write_image("g.png", lambda: Image.fromarray(pixels(10, channels=1, dtype=np.uint16, high=65536)))),
]


@pytest.fixture(scope="module")
def shared(tiny_llava_dir, tiny_bundle, tiny_image):
    return SimpleNamespace(model=Path(tiny_llava_dir), bundle=Path(tiny_bundle), image=Path(tiny_image))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared, tmp_path):
    c = SimpleNamespace(tmp=tmp_path, **vars(shared))
    if case.drop_dac and shutil.which("setpriv") is None and os.geteuid() == 0:
        pytest.skip("root ignores read-only folders and setpriv is missing")
    if case.setup is not None:
        case.setup(c)
    argv = case.argv(c)
    roots = (tmp_path, c.model, c.bundle, c.image)
    before = snapshot(*roots)
    p = run_cli(argv, drop_dac=case.drop_dac)
    if (tmp_path / "ro").exists():
        (tmp_path / "ro").chmod(0o755)  # so that pytest can clean up
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
        assert p.stdout == "", p.stdout
    assert after == before, "files were added, removed or changed: " + str(set(after.items()) ^ set(before.items()))


# ------------------------------------------------------------------------------------------ disk full
# No small filesystem can be mounted here, so the CLI runs with one write made to fail as a full disk
# does: part of the bytes land, then ENOSPC. The rest of the process is the real `vtprune export`.

FULL_DISK = """
import errno, os, sys
from pathlib import Path
import onnx

def full(path, data):
    Path(path).write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

if sys.argv[1] == "first-graph":
    onnx.save_model = lambda proto, f, *a, **k: full(f, proto.SerializeToString())
else:  # the manifest, the last file written
    real_write_text = Path.write_text
    Path.write_text = lambda self, text, *a, **k: (full(self, text.encode()) if self.name.startswith("manifest")
                                                   else real_write_text(self, text, *a, **k))
from vtprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


# The manifest is written last, after a whole export (~20 s): slow; tests/export/test_bundle.py covers it in-process.
@pytest.mark.parametrize("where", ["first-graph", pytest.param("manifest", marks=pytest.mark.slow)])
def test_disk_full_during_export_leaves_nothing(where, tiny_llava_dir, tmp_path):
    """ENOSPC mid-export: one line naming --out and the cause, no partial folder, the checkpoint untouched."""
    before = snapshot(tmp_path, Path(tiny_llava_dir))
    argv = [sys.executable, "-c", FULL_DISK, where, "export", "--model", str(tiny_llava_dir), "--out", str(tmp_path / "out")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtprune: error: --out: ") and "No space left" in lines[0], p.stderr
    assert snapshot(tmp_path, Path(tiny_llava_dir)) == before


def test_disk_full_while_writing_a_manifest_keeps_the_old_one(tmp_path, monkeypatch):
    """The manifest is replaced whole or not at all (quantize rewrites it in place)."""
    from vtprune.export.bundle import write_manifest

    write_manifest(tmp_path, {"format_version": 1})
    before = snapshot(tmp_path)
    real_write = Path.write_text

    def full(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_manifest(tmp_path, {"format_version": 1, "graphs": {"x": "y" * 1000}})
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no manifest.json.tmp left, the old manifest intact
