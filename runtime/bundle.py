"""Open a bundle safely: the manifest is the only thing read, every path it names stays inside the
bundle folder, every graph's checksum matches, and the format version is one this runtime knows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig  # a plain dataclass: torch-free

FORMAT_VERSION = 1  # the bundle format this runtime reads (export/bundle.py writes the same number)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        root = Path(path)
        if not root.is_dir():
            raise UserError(str(root), "expected a bundle folder written by `vtprune export`; no such folder")
        mpath = root / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise UserError(str(mpath), "missing: expected a bundle folder written by `vtprune export`") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(str(mpath), f"expected a JSON manifest: {e}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
            raise UserError(str(mpath), "expected a manifest object with an integer format_version")
        version = manifest["format_version"]
        if version > FORMAT_VERSION:
            raise UserError(str(mpath), f"bundle format {version} is newer than this vtprune reads ({FORMAT_VERSION}); upgrade vtprune")
        if version < FORMAT_VERSION:
            raise UserError(str(mpath), f"bundle format {version} is older than {FORMAT_VERSION}; re-export it with this vtprune")
        for key in ("graphs", "io", "model", "embed_tokens", "tokenizer", "preprocessor", "prompt_template", "prune"):
            if key not in manifest:
                raise UserError(str(mpath), f"missing field {key!r}")
        _check_fields(manifest, str(mpath))
        return cls(root, manifest)

    def path(self, name: str) -> Path:
        """A file the manifest names, confined to the bundle folder (no absolute paths, no `..`, no links out)."""
        if not isinstance(name, str) or not name:
            raise UserError(str(self.root / "manifest.json"), f"expected a file name, got {name!r}")
        candidate = (self.root / name).resolve()
        if self.root.resolve() not in candidate.parents:
            raise UserError(str(self.root / "manifest.json"), f"names {name!r}, which is outside the bundle folder")
        if not candidate.is_file():
            raise UserError(str(self.root / "manifest.json"), f"names {name!r}, which is missing from the bundle")
        return candidate

    def array(self, entry: dict) -> np.ndarray:
        """A .npy file the manifest names (`file`, `sha256`, `shape`): checksummed, never unpickled, shape checked."""
        path = self.checked(entry["file"], entry.get("sha256"))
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # an object array (pickle) is a ValueError here
            raise UserError(str(path), f"expected a numeric .npy array saved without pickle: {e}") from None
        if array.dtype.kind != "f" or ("shape" in entry and list(array.shape) != list(entry["shape"])):
            raise UserError(str(path), f"expected a float array of shape {entry.get('shape')} (the manifest's), "
                                       f"got {array.dtype} {list(array.shape)}")
        return array

    def checked(self, name: str, expected_sha256: str | None) -> Path:
        path = self.path(name)
        if expected_sha256 is not None and _sha256(path) != expected_sha256:
            raise UserError(str(path), "checksum differs from the manifest's: the file was changed or truncated; re-export the bundle")
        return path

    def graph(self, which: str, precision: str) -> Path:
        """The graph file of one variant (fp32, int8, int4, ...), its checksums verified."""
        variants = self.manifest["graphs"].get(which, {})
        if precision not in variants:
            have = ", ".join(sorted(variants)) or "none"
            raise UserError("--precision", f"the bundle has no {precision!r} {which} graph (it has: {have}); run `vtprune quantize`")
        entry = variants[precision]
        for name, digest in entry.get("sha256", {entry["file"]: None}).items():
            self.checked(name, digest)
        return self.path(entry["file"])

    def provider_options(self, which: str, precision: str) -> dict[str, dict]:
        """Per-provider options a variant was built with (TensorRT engine caches), paths joined to the bundle."""
        options = self.manifest["graphs"][which][precision].get("provider_options", {})
        joined = {}
        for ep, opts in options.items():
            joined[ep] = {}
            for key, value in opts.items():
                if key.endswith("_path"):
                    path = (self.root / value).resolve()
                    if self.root.resolve() not in path.parents and path != self.root.resolve():
                        raise UserError(str(self.root / "manifest.json"), f"names {value!r}, which is outside the bundle folder")
                    value = str(path)
                joined[ep][key] = value
        return joined

    @property
    def precisions(self) -> list[str]:
        return sorted(set(self.manifest["graphs"].get("decoder", {})) & set(self.manifest["graphs"].get("vision", {})))

    def check_prune(self, prune) -> None:
        """Stage 1 runs inside vision.onnx at the layer it was exported with: a run may change the budgets, not that."""
        exported = self.manifest["prune"]["prune_layer"]
        if prune.visual and prune.prune_layer != exported:
            raise UserError("--prune-layer", f"the bundle was exported with prune_layer {exported}; re-export to change it")


MODEL_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "context_length", "num_patches")


def _check_fields(manifest: dict, where: str) -> None:
    """The manifest's parts the runtime reads have the types it expects, so a hand-edited or damaged
    manifest is one clear error rather than a KeyError deep inside generation."""
    graphs = manifest["graphs"]
    for which in ("vision", "decoder"):
        variants = graphs.get(which) if isinstance(graphs, dict) else None
        if not isinstance(variants, dict) or not variants:
            raise UserError(where, f"expected `graphs.{which}` to list at least one variant; re-export the bundle")
        for precision, entry in variants.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise UserError(where, f"expected `graphs.{which}.{precision}` to be an object with a `file`")
    model = manifest["model"]
    bad = [k for k in MODEL_FIELDS if not (isinstance(model, dict) and type(model.get(k)) is int and model[k] > 0)]
    if bad:
        raise UserError(where, f"expected `model` to give positive integers for {', '.join(bad)}; re-export the bundle")
    for key in ("embed_tokens", "tokenizer"):
        if not isinstance(manifest[key], dict) or not isinstance(manifest[key].get("file"), str):
            raise UserError(where, f"expected `{key}` to be an object with a `file`")
    for key in ("preprocessor", "prompt_template"):
        if not isinstance(manifest[key], str):
            raise UserError(where, f"expected `{key}` to be a string")
    known = {f.name for f in fields(PruneConfig)}
    if not isinstance(manifest["prune"], dict) or not set(manifest["prune"]) <= known:
        raise UserError(where, f"expected `prune` to be an object with keys among {', '.join(sorted(known))}")
