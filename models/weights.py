"""A checkpoint's tensors, one at a time: what the streaming export reads instead of a loaded model.

A llava-hf folder stores its tensors in one `model.safetensors` or in shards named by
`model.safetensors.index.json`. `CheckpointWeights` reads every shard's header (never its data), checks
that the shards and the index agree, and maps the stored names to the names `transformers` gives the
parameters of `LlavaForConditionalGeneration`: llava-hf/llava-1.5-7b-hf stores the legacy layout
(`language_model.model.layers.0...`, `language_model.lm_head...`, `vision_tower...`), transformers 5 saves
`model.language_model.layers.0...`; both are read. `tensor(name)` then reads that one tensor from its
shard, so peak memory is the largest tensor, not the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtprune.errors import UserError

# Stored name -> transformers 5 parameter name (transformers' own "llava" conversion mapping, applied once).
LEGACY_PREFIXES = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}  # tie_word_embeddings: no lm_head stored
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}  # BF16: no numpy dtype


def canonical_name(stored: str) -> str:
    for pattern, replacement in LEGACY_PREFIXES:
        if re.match(pattern, stored):
            return re.sub(pattern, replacement, stored)
    return stored


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    stored_name: str
    dtype: str  # safetensors dtype code, e.g. "F16"
    shape: tuple[int, ...]


class CheckpointWeights:
    """The tensors of a checkpoint folder by their transformers name; data read one tensor at a time."""

    def __init__(self, files: list[Path], index: Path | None = None):
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for stored, entry in _header(f).items():
                if stored == "__metadata__":
                    continue
                name = canonical_name(stored)
                if name in self.tensors:
                    raise UserError(str(f), f"tensor {stored} is stored twice (also in {self.tensors[name].file.name})")
                self.tensors[name] = TensorInfo(f, stored, entry["dtype"], tuple(entry["shape"]))
        if index is not None:
            self._check_index(index)

    @classmethod
    def open(cls, model_dir: str | Path) -> "CheckpointWeights":
        from vtprune.models.loading import weight_files

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        return cls(weight_files(model_dir), index if index.is_file() else None)

    def _check_index(self, index: Path) -> None:
        weight_map = json.loads(index.read_text())["weight_map"]
        held = {info.stored_name: info.file.name for info in self.tensors.values()}
        for stored, shard in weight_map.items():
            if held.get(stored) != shard:
                where = f"in {held[stored]}" if stored in held else "in no shard"
                raise UserError(str(index), f"says tensor {stored} is in {shard}, but it is {where}")
        extra = sorted(set(held) - set(weight_map))
        if extra:
            raise UserError(str(index), f"does not list tensor {extra[0]} ({len(extra)} stored tensor(s) missing from the index)")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        name = name if name in self.tensors else TIED.get(name, name)
        if name not in self.tensors:
            raise UserError("checkpoint", f"has no tensor {name} (nor its legacy llava-hf name); expected every "
                                          "parameter of the model config.json describes")
        return self.tensors[name]

    def nbytes(self, prefixes: tuple[str, ...], itemsize: int) -> int:
        """Bytes of the tensors under `prefixes` at `itemsize` bytes per element (4: as fp32)."""
        return sum(int(np.prod(t.shape)) * itemsize for name, t in self.tensors.items() if name.startswith(prefixes))

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor, converted to `dtype` (bf16 goes through torch, which has the type numpy lacks)."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:  # "pt" reads bf16 too
            t = f.get_tensor(info.stored_name)
        import torch

        return t.to(torch.from_numpy(np.zeros(0, dtype)).dtype).numpy()

    def state_dict(self, prefix: str) -> dict:
        """Every tensor under a transformers name prefix as torch tensors (the vision tower, the projector)."""
        import torch

        return {name[len(prefix):]: torch.from_numpy(self.tensor(name)) for name in self.tensors if name.startswith(prefix)}


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))
