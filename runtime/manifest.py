"""The schema of manifest.json (pydantic): every field the runtime reads is typed and ranged, and every file name
it holds is a plain relative name, before anything in the bundle is opened or allocated.

Why a schema rather than checks where each field is used: a hand-edited or damaged manifest is then one error
naming the field (`manifest.json: field model.num_layers: ...`), not a KeyError or a multi-gigabyte allocation deep
inside generation. What the schema cannot see (the graphs' real inputs, the embedding table's header, the
tokenizer's ids) `Bundle` and `Pipeline` compare with it when they open those files.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from vtprune.errors import UserError

# Ranges far above any real model, far below what would make an allocation or a loop absurd.
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 17  # hidden size, head_dim
MAX_HEADS = 4096
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24
MAX_PATCHES = 1 << 20
MAX_IMAGE = 8192


def _bundle_name(name: str) -> str:
    """A file the manifest names must be a relative name inside the bundle: no absolute path, no `..`, no NUL."""
    if not name or "\x00" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() \
            or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ValueError(f"names {name!r}, which is outside the bundle folder (expected a relative file name inside it)")
    return name


Name = Annotated[str, AfterValidator(_bundle_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Pos = Annotated[int, Field(ge=1)]
Dim = Union[Annotated[int, Field(ge=0, le=1 << 31)], Annotated[str, Field(max_length=64)]]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class GraphEntry(_Strict):
    file: Name
    external_data: Optional[Name] = None
    sha256: dict[Name, Sha256]
    precision: Optional[str] = None
    providers: list[str] = []
    provider_options: dict[str, dict[str, Union[bool, int, float, str]]] = {}


class Graphs(_Strict):
    vision: Annotated[dict[str, GraphEntry], Field(min_length=1)]
    decoder: Annotated[dict[str, GraphEntry], Field(min_length=1)]


class IoTable(_Strict):
    inputs: dict[str, list[Dim]]
    outputs: dict[str, list[Dim]]


class Io(_Strict):
    vision: IoTable
    decoder: IoTable


class ModelDims(_Strict):
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    hidden_size: Annotated[int, Field(ge=1, le=MAX_WIDTH)]
    num_kv_heads: Annotated[int, Field(ge=1, le=MAX_HEADS)]
    head_dim: Annotated[int, Field(ge=1, le=MAX_WIDTH)]
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)]
    context_length: Annotated[int, Field(ge=1, le=MAX_CONTEXT)]
    num_patches: Annotated[int, Field(ge=1, le=MAX_PATCHES)]
    image_size: Annotated[int, Field(ge=1, le=MAX_IMAGE)] = 224
    image_token_id: Annotated[int, Field(ge=0, lt=MAX_VOCAB)]


class EmbedTokens(_Strict):
    file: Name
    sha256: Optional[Sha256] = None
    shape: Annotated[list[Pos], Field(min_length=2, max_length=2)]
    dtype: Literal["float32", "float16"] = "float32"


class TokenizerFiles(_Strict):
    file: Name
    config: Optional[Name] = None


class Sample(_Strict):
    image: Name
    question: Name


class Prune(BaseModel):
    """The knobs the graphs were exported with; their ranges are PruneConfig's (checked when it is built)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    visual: bool = True
    text: bool = True
    prune_layer: int = 3
    alpha: float = 0.075
    k_min: int = 1
    heavy_ratio: float = 0.5
    recent_ratio: float = 0.5
    heavy_budget: Optional[Annotated[int, Field(ge=0, lt=1 << 63)]] = None
    recent_budget: Optional[Annotated[int, Field(ge=0, lt=1 << 63)]] = None
    policy: str = "h2o"
    snap_window: Annotated[int, Field(lt=1 << 63)] = 16
    visual_floor: float = 0.25


class Generation(_Strict):
    max_new_tokens: Pos = 64
    eos_token_id: Union[None, Annotated[int, Field(ge=0)], list[Annotated[int, Field(ge=0)]]] = None
    bos_token_id: Optional[Annotated[int, Field(ge=0)]] = None


class Manifest(_Strict):
    format_version: int
    opset: Optional[int] = None
    source: Optional[dict] = None
    prune: Prune
    decoder_form: Literal["fused", "portable", "ort", "inplace"] = "portable"  # inplace: the cache is fixed buffers (runtime/slots.py)
    model: ModelDims
    graphs: Graphs
    io: Io
    embed_tokens: EmbedTokens
    tokenizer: TokenizerFiles
    preprocessor: Name
    prompt_template: Annotated[str, Field(max_length=1 << 16)]
    sample: Optional[Sample] = None
    generation: Optional[Generation] = None


def validate(manifest: object, where: str) -> Manifest:
    """The manifest against the schema; the first violation becomes one UserError naming the field."""
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
        got = "" if err["type"] in ("missing", "value_error") else f", got {_short(err.get('input'))}"
        raise UserError(where, f"field {loc}: {msg}{got}; re-export the bundle with this vtprune") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
