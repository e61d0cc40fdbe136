"""Open a bundle safely: the manifest is the only thing read, every path it names stays inside the
bundle folder, every graph's checksum matches, and the format version is one this runtime knows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vtprune.errors import UserError

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

    @property
    def precisions(self) -> list[str]:
        return sorted(set(self.manifest["graphs"].get("decoder", {})) & set(self.manifest["graphs"].get("vision", {})))
