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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtprune.errors import UserError, parse_json, read_json_object

# llava-hf's stored prefix -> transformers 5's parameter prefix (transformers' own "llava" conversion mapping).
LEGACY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}  # tie_word_embeddings: no lm_head stored
# Every dtype safetensors writes, with its size in bits (safetensors' Dtype enum).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def canonical_name(stored: str) -> str:
    """A stored tensor name -> the name transformers gives the parameter."""
    for legacy, current in LEGACY_PREFIXES:
        if stored.startswith(legacy):
            return current + stored[len(legacy):]
    return stored


def legacy_name(name: str) -> str:
    """transformers 5's parameter name -> the name llava-hf's files use (canonical_name's inverse)."""
    for legacy, current in LEGACY_PREFIXES:
        if name.startswith(current):
            return legacy + name[len(current):]
    return name


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
            for stored, entry in read_header(f).items():
                name = canonical_name(stored)
                if name in self.tensors:
                    raise UserError(str(f), f"tensor {stored} is stored twice (also in {self.tensors[name].file.name})")
                self.tensors[name] = TensorInfo(f, stored, entry["dtype"], tuple(entry["shape"]))
        if index is not None:
            self._check_index(index)

    @classmethod
    def open(cls, model_dir: str | Path) -> "CheckpointWeights":
        """A model folder's weights: every header validated, the index against the shards, config.json against
        the shapes (before anything is built)."""
        from vtprune.models.loading import check_weights_agree, read_config, weight_files

        model_dir = Path(model_dir)
        config = read_config(model_dir)
        index = model_dir / "model.safetensors.index.json"
        weights = cls(weight_files(model_dir), index if index.is_file() else None)
        check_weights_agree(config, {n: t.shape for n, t in weights.tensors.items()}, str(model_dir / "config.json"),
                            lambda name: weights.tensors[name].file if name in weights.tensors else None)
        return weights

    def _check_index(self, index: Path) -> None:
        weight_map = read_index(index)
        held = {info.stored_name: info.file.name for info in self.tensors.values()}
        for stored, shard in weight_map.items():
            if held.get(stored) != shard:
                where = f"in {held[stored]}" if stored in held else "in no shard"
                raise UserError(str(index), f"says tensor {stored} is in {shard}, but it is {where}")
        extra = sorted(set(held) - set(weight_map))
        if extra:
            raise UserError(str(index), f"does not list tensor {extra[0]} ({len(extra)} stored tensor(s) missing from the index)")

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
        """One tensor, converted to `dtype` (bf16 goes through torch, which has the type numpy lacks; an F16
        tensor asked for as float16 comes back as stored)."""
        import torch
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:  # "pt" reads bf16 too
            t = f.get_tensor(info.stored_name)
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().astype(dtype, copy=False)


def read_index(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file name), every key and value a string."""
    data = read_json_object(index, "a model.safetensors.index.json", "safetensors index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(str(index), "expected a safetensors index with a 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise UserError(str(index), f"weight_map[{name!r}] is {shard!r}; expected the name of a shard file")
    return weight_map


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header, validated as safetensors itself would before it maps a byte: a JSON object of
    tensors, each with a known dtype, a shape whose bytes equal its data span, and spans that tile the data
    exactly (in bounds, in order, no overlap, no gap). Returns the tensors (without `__metadata__`).
    The one header check: ModelFolder, load_llava and the streaming export all come through here."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 1 or n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file (truncated, or not safetensors?)")
            text = fh.read(n)
    except OSError as e:
        raise UserError(str(path), f"cannot read the safetensors file: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(str(path), f"not a valid safetensors file: {e}") from None
    header = parse_json(text, str(path), "safetensors header")
    if not isinstance(header, dict):
        raise UserError(str(path), f"not a valid safetensors file: the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(str(path), "not a valid safetensors file: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        def bad(what: str):
            return UserError(str(path), f"not a valid safetensors file: tensor {name!r} {what}")

        if not isinstance(entry, dict):
            raise bad(f"is described by a {type(entry).__name__}, expected an object with dtype, shape, data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(f"has dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise bad(f"has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_size:
            raise bad(f"ends at byte {offsets[1]} of the data, but the file holds {data_size} bytes of data (truncated?)")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits != 8 * (offsets[1] - offsets[0]):
            raise bad(f"of shape {shape} and dtype {dtype} needs {bits / 8:.0f} bytes, its data_offsets span "
                      f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise UserError(str(path), f"not a valid safetensors file: tensor {name!r} starts at byte {begin} of the data, "
                                       f"expected {end} ({'overlapping' if begin < end else 'a gap between'} tensors)")
        end = stop
    if end != data_size:
        raise UserError(str(path), f"not a valid safetensors file: tensors end at byte {8 + n + end} but the file has "
                                   f"{size} bytes (truncated?)")
    return header
