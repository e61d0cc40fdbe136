"""Open a bundle safely: the manifest is the only thing read, every path it names stays inside the
bundle folder, every graph's checksum matches, and the format version is one this runtime knows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtprune.errors import UserError, read_json
from vtprune.models.config import PruneConfig  # a plain dataclass: torch-free
from vtprune.runtime import manifest as schema

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
        if not mpath.is_file():
            raise UserError(str(mpath), "missing: expected a bundle folder written by `vtprune export`")
        manifest = read_json(mpath, "a bundle's manifest.json", "manifest")
        if not isinstance(manifest, dict) or type(manifest.get("format_version")) is not int:
            raise UserError(str(mpath), "expected a manifest object with an integer format_version")
        version = manifest["format_version"]
        if version > FORMAT_VERSION:
            raise UserError(str(mpath), f"bundle format {version} is newer than this vtprune reads ({FORMAT_VERSION}); upgrade vtprune")
        if version < FORMAT_VERSION:
            raise UserError(str(mpath), f"bundle format {version} is older than {FORMAT_VERSION}; re-export it with this vtprune")
        schema.validate(manifest, str(mpath))  # every field typed and ranged, every name relative
        bundle = cls(root, manifest)
        bundle._check_prune_fields()
        return bundle

    def path(self, name: str) -> Path:
        """A file the manifest names, confined to the bundle folder (no absolute paths, no `..`, no links out)."""
        if not isinstance(name, str) or not name:
            raise UserError(str(self.root / "manifest.json"), f"expected a file name, got {name!r}")
        try:
            candidate = (self.root / name).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a link loop, a NUL byte
            raise UserError(str(self.root / "manifest.json"), f"names {name!r}, which cannot be resolved: {e}") from None
        if self.root.resolve() not in candidate.parents:
            raise UserError(str(self.root / "manifest.json"), f"names {name!r}, which is outside the bundle folder")
        if not candidate.is_file():
            raise UserError(str(self.root / "manifest.json"), f"names {name!r}, which is missing from the bundle")
        return candidate

    def array(self, entry: dict) -> np.ndarray:
        """A .npy file the manifest names (`file`, `sha256`, `shape`): its header read and compared with the
        manifest and the file's size before anything is allocated; checksummed, never unpickled."""
        path = self.path(entry["file"])
        check_npy_header(path, entry["shape"], self.root / "manifest.json")
        path = self.checked(entry["file"], entry.get("sha256"))
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # an object array (pickle) is a ValueError here
            raise UserError(str(path), f"expected a numeric .npy array saved without pickle: {e}") from None
        if array.dtype.kind != "f" or list(array.shape) != list(entry["shape"]):
            raise UserError(str(path), f"expected a float array of shape {entry.get('shape')} (the manifest's), "
                                       f"got {array.dtype} {list(array.shape)}")
        return array

    def sample(self) -> tuple[Path, Path] | None:
        """The bundle's sample image and question (`vtprune run --bundle B` with neither --image nor --prompt),
        confined to the bundle like every other file the manifest names; None when the bundle has none."""
        sample = self.manifest.get("sample")
        if sample is None:
            return None
        names = (sample["image"], sample["question"])
        if not all((self.root / name).is_file() or (self.root / name).is_symlink() for name in names):
            return None
        return self.path(names[0]), self.path(names[1])  # confined: a link out of the bundle is refused

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
                    if not isinstance(value, str) or "\x00" in value:
                        raise UserError(str(self.root / "manifest.json"), f"field graphs.{which}.{precision}.provider_options."
                                                                          f"{ep}.{key}: expected a folder name, got {value!r}")
                    path = (self.root / value).resolve()
                    if self.root.resolve() not in path.parents and path != self.root.resolve():
                        raise UserError(str(self.root / "manifest.json"), f"names {value!r}, which is outside the bundle folder")
                    value = str(path)
                joined[ep][key] = value
        return joined

    @property
    def precisions(self) -> list[str]:
        return sorted(set(self.manifest["graphs"].get("decoder", {})) & set(self.manifest["graphs"].get("vision", {})))

    def _check_prune_fields(self) -> None:
        """The exported pruning knobs in PruneConfig's ranges, an error blaming the manifest's field (not an option)."""
        try:
            PruneConfig(**self.manifest["prune"])
        except UserError as e:
            field = e.where.lstrip("-").replace("-", "_")
            raise UserError(str(self.root / "manifest.json"), f"field prune.{field}: {e.what}; re-export the bundle") from None
        m = self.manifest["model"]
        if m["image_token_id"] >= m["vocab_size"]:
            raise UserError(str(self.root / "manifest.json"), f"field model.image_token_id: {m['image_token_id']} is outside "
                                                              f"the vocabulary of {m['vocab_size']} (model.vocab_size)")
        if list(self.manifest["embed_tokens"]["shape"]) != [m["vocab_size"], m["hidden_size"]]:
            raise UserError(str(self.root / "manifest.json"), f"field embed_tokens.shape: {self.manifest['embed_tokens']['shape']} "
                                                              f"differs from [model.vocab_size, model.hidden_size] = "
                                                              f"{[m['vocab_size'], m['hidden_size']]}")

    def check_prune(self, prune) -> None:
        """Stage 1 runs inside vision.onnx at the layer it was exported with: a run may change the budgets, not that."""
        exported = self.manifest["prune"]["prune_layer"]
        if prune.visual and prune.prune_layer != exported:
            raise UserError("--prune-layer", f"the bundle was exported with prune_layer {exported}; re-export to change it")


def check_npy_header(path: Path, shape: list[int], manifest: Path) -> None:
    """The .npy header (magic, version, dtype, shape) against the manifest and the file's size, before loading:
    a header claiming 10^12 rows is refused here, not by the allocator."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f, max_header_size=1 << 16)
            elif version in ((2, 0), (3, 0)):
                header = np.lib.format.read_array_header_2_0(f, max_header_size=1 << 16)
            else:
                raise ValueError(f"unknown .npy version {version}")
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise UserError(str(path), f"expected a .npy array with a readable header: {e}") from None
    file_shape, fortran, dtype = header
    if dtype.hasobject or dtype.kind != "f":
        raise UserError(str(path), f"expected a float array saved without pickle, got dtype {dtype}")
    if list(file_shape) != list(shape):
        raise UserError(str(path), f"the header's shape {list(file_shape)} differs from the manifest's embed_tokens.shape "
                                   f"{list(shape)} ({manifest})")
    nbytes = int(np.prod(file_shape, dtype=object)) * dtype.itemsize
    size = path.stat().st_size
    if offset + nbytes != size:
        raise UserError(str(path), f"the header's shape {list(file_shape)} needs {nbytes} bytes of data, the file holds "
                                   f"{size - offset}: truncated or not the array the manifest names")
