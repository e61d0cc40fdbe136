"""Load a llava-hf checkpoint folder (the layout of `llava-hf/llava-1.5-7b-hf`), safely.

`ModelFolder` is the one loader every command and benchmark uses: the folder's checked config and weights, its
prompt tokenizer and image preprocessing (torch-free, `vtprune.models.prompt` / `.preprocess`), and on demand
the PyTorch reference with the pruning knobs. The tokenizer and preprocessing live in models/ (not in the
runtime, which builds a bundle's the same way) so that this loader, in the lowest layer, can use them; they
import no torch, so the runtime importing them still runs without it.

Everything is checked before a weight is read: the config names a LLaVA with a CLIP vision tower and
a Llama-family text model, the weights are safetensors (a pickle-only folder is refused: unpickling
runs arbitrary code), every shard the index names exists, and every file's header parses.
Weights are read by `transformers` with `use_safetensors=True`; remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable

from vtprune.errors import UserError, read_json_object
from vtprune.models.preprocess import PreprocessConfig
from vtprune.models.prompt import PromptTokenizer
from vtprune.models.weights import read_header, read_index

TEXT_MODEL_TYPES = ("llama", "mistral")  # Llama-family decoders: same layers, RoPE, GQA
VISION_MODEL_TYPES = ("clip_vision_model",)
EMBEDDED = Path(__file__).parent / "embedded" / "checkpoint"  # the folder beside the code that trained it


def default_model_dir() -> Path:
    """The embedded model shipped inside the package: what every command uses when no --model is given."""
    return EMBEDDED


def read_config(model_dir: str | Path) -> dict:
    """config.json of a llava-hf folder, validated: model_type llava, CLIP vision, Llama-family text."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(str(model_dir), "expected a llava-hf checkpoint folder (config.json + *.safetensors); no such folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(str(path), "missing: a llava-hf checkpoint folder needs config.json")
    config = read_json_object(path, "a llava-hf config.json", "model config")
    if config.get("model_type") != "llava":
        raise UserError(str(path), f"model_type is {config.get('model_type')!r}, expected 'llava' (a LLaVA-1.5 checkpoint)")
    for key, allowed in (("vision_config", VISION_MODEL_TYPES), ("text_config", TEXT_MODEL_TYPES)):
        sub = config.get(key)
        if not isinstance(sub, dict):
            raise UserError(str(path), f"missing field {key!r}: expected a LLaVA config with a vision and a text model")
        if sub.get("model_type") not in allowed:
            raise UserError(str(path), f"{key}.model_type is {sub.get('model_type')!r}, expected one of {', '.join(allowed)}")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UserError(str(path), f"vision_feature_select_strategy is {strategy!r}, expected 'default' or 'full'")
    if type(config.get("vision_feature_layer", -2)) is not int:
        raise UserError(str(path), "vision_feature_layer must be one integer (several feature layers are not supported)")
    check_config_values(config, str(path))
    return config


# Each field the graphs and the reference size themselves by: (default transformers fills in, upper bound).
# The bounds are far above any real model and far below what would build layers for minutes.
TEXT_FIELDS = {"hidden_size": (4096, 1 << 16), "intermediate_size": (11008, 1 << 18), "num_hidden_layers": (32, 1024),
               "num_attention_heads": (32, 1024), "vocab_size": (32000, 1 << 22), "max_position_embeddings": (2048, 1 << 24)}
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "max_position_embeddings": 4096 * 32}
VISION_FIELDS = {"hidden_size": (768, 1 << 14), "intermediate_size": (3072, 1 << 16), "num_hidden_layers": (12, 256),
                 "num_attention_heads": (12, 256), "image_size": (224, 4096), "patch_size": (32, 1024)}
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")  # dynamic and longrope rescale by the sequence length at run time


def text_dims(config: dict) -> dict:
    """The text model's sizes, with the defaults transformers fills in for a missing field."""
    text = config["text_config"]
    mistral = text.get("model_type") == "mistral"
    dims = {k: text[k] if text.get(k) is not None else (MISTRAL_DEFAULTS.get(k, d) if mistral else d)
            for k, (d, _) in TEXT_FIELDS.items()}  # an explicit null takes the default, as transformers does
    dims["num_key_value_heads"] = text.get("num_key_value_heads") or (8 if text.get("model_type") == "mistral" else None) \
        or dims["num_attention_heads"]
    head_dim = text.get("head_dim")
    dims["head_dim"] = head_dim if head_dim is not None else dims["hidden_size"] // max(dims["num_attention_heads"], 1)
    return dims


def context_length(config: dict) -> int:
    """Positions a prompt and its answer may span: max_position_embeddings, or a Mistral's `sliding_window` when it
    is shorter. The reference and the graphs attend to the whole (pruned) cache, not to a window, so a sequence
    past the window would answer differently from transformers: it is refused, never answered wrongly."""
    text = config["text_config"]
    window = text.get("sliding_window") if text.get("model_type") == "mistral" else None
    return min(text_dims(config)["max_position_embeddings"], window or 1 << 62)


def sliding_window(config: dict) -> int | None:
    """The window when it, not the position table, bounds the context (context_length)."""
    text = config["text_config"]
    window = text.get("sliding_window") if text.get("model_type") == "mistral" else None
    return window if window and window < text_dims(config)["max_position_embeddings"] else None


def vision_dims(config: dict) -> dict:
    vision = config["vision_config"]
    return {k: vision[k] if vision.get(k) is not None else d for k, (d, _) in VISION_FIELDS.items()}


def check_config_values(config: dict, where: str) -> None:
    """Types and ranges of every size config.json gives, and how they fit together, before anything is built:
    `num_hidden_layers: 1000000000` fails here in a millisecond, not after minutes of building layers."""
    for section, fields in (("text_config", TEXT_FIELDS), ("vision_config", VISION_FIELDS)):
        for key, (_, top) in fields.items():
            value = config[section].get(key)
            if value is not None and not (type(value) is int and 1 <= value <= top):
                raise UserError(where, f"{section}.{key} is {value!r}; expected an integer from 1 to {top}")
    text, vision = config["text_config"], config["vision_config"]
    for key, top in (("num_key_value_heads", 1024), ("head_dim", 1 << 14)):
        value = text.get(key)
        if value is not None and not (type(value) is int and 1 <= value <= top):
            raise UserError(where, f"text_config.{key} is {value!r}; expected an integer from 1 to {top}")
    t, v = text_dims(config), vision_dims(config)
    if text.get("head_dim") is None and t["hidden_size"] % t["num_attention_heads"]:
        raise UserError(where, f"text_config.hidden_size {t['hidden_size']} is not a multiple of num_attention_heads "
                               f"{t['num_attention_heads']} (and no head_dim is given)")
    if t["num_attention_heads"] % t["num_key_value_heads"]:
        raise UserError(where, f"text_config.num_attention_heads {t['num_attention_heads']} is not a multiple of "
                               f"num_key_value_heads {t['num_key_value_heads']}")
    if v["hidden_size"] % v["num_attention_heads"]:
        raise UserError(where, f"vision_config.hidden_size {v['hidden_size']} is not a multiple of num_attention_heads "
                               f"{v['num_attention_heads']}")
    if v["image_size"] % v["patch_size"]:
        raise UserError(where, f"vision_config.image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}")
    layer = config.get("vision_feature_layer", -2)
    if not -v["num_hidden_layers"] <= layer < v["num_hidden_layers"] + 1:
        raise UserError(where, f"vision_feature_layer is {layer}; the vision tower has {v['num_hidden_layers']} layers")
    image_token = config.get("image_token_id", config.get("image_token_index", 32000))
    if not (type(image_token) is int and 0 <= image_token < t["vocab_size"]):
        raise UserError(where, f"image_token_id is {image_token!r}; expected an id inside the vocabulary of {t['vocab_size']}")
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5's name, and the one older files carry
        rope = text.get(key) or {}
        if not isinstance(rope, dict):
            raise UserError(where, f"text_config.{key} is {rope!r}; expected an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise UserError(where, f"text_config.{key} has rope type {rope_type!r}, which vtprune does not support (it "
                                   f"rescales by the sequence length at run time); supported: {', '.join(SUPPORTED_ROPE)}")
    window = text.get("sliding_window")
    if window is not None and not (type(window) is int and window >= 1):
        raise UserError(where, f"text_config.sliding_window is {window!r}; expected null or a positive integer")


def check_weights_agree(config: dict, shapes: dict[str, tuple], where_config: str, file_of) -> None:
    """config.json against the weights' shapes (from their headers), before anything is built: the layer counts,
    the embedding table, the attention projections (head_dim and GQA), the vision tower's patch grid.
    `shapes`: transformers name -> shape; `file_of(name)`: the file holding it, for the message."""
    t, v = text_dims(config), vision_dims(config)
    shapes = {re.sub(r"^model\.vision_tower\.vision_model\.", "model.vision_tower.", k): v for k, v in shapes.items()}
    for prefix, count, section in (("model.language_model.layers.", t["num_hidden_layers"], "text_config"),
                                   ("model.vision_tower.encoder.layers.", v["num_hidden_layers"], "vision_config")):
        stored = {int(m.group(1)) for name in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", name))}
        if stored and max(stored) + 1 != count:
            raise UserError(where_config, f"{section}.num_hidden_layers is {count}, the weights hold {max(stored) + 1} layers")
    q_out = t["num_attention_heads"] * t["head_dim"]
    kv_out = t["num_key_value_heads"] * t["head_dim"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    needed = {
        "model.language_model.embed_tokens.weight": (t["vocab_size"], t["hidden_size"]),
        "model.language_model.layers.0.self_attn.q_proj.weight": (q_out, t["hidden_size"]),
        "model.language_model.layers.0.self_attn.k_proj.weight": (kv_out, t["hidden_size"]),
        "model.language_model.layers.0.mlp.gate_proj.weight": (t["intermediate_size"], t["hidden_size"]),
        "model.vision_tower.embeddings.patch_embedding.weight": (v["hidden_size"], 3, v["patch_size"], v["patch_size"]),
        "model.vision_tower.embeddings.position_embedding.weight": (patches + 1, v["hidden_size"]),
    }
    for name, shape in needed.items():
        if name in shapes and tuple(shapes[name]) != shape:
            raise UserError(str(file_of(name) or where_config), f"tensor {name} has shape {list(shapes[name])}, but config.json needs "
                                                f"{list(shape)}")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, single or sharded, each checked to exist and parse."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_index(index).values()))
        files = []
        for name in names:
            # Checked by name, not by resolved path: in the Hugging Face cache each shard is a link into blobs/.
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise UserError(str(index), f"names {name!r}, outside the checkpoint folder")
            shard = model_dir / name
            if not shard.is_file():
                raise UserError(str(index), f"names shard {name!r}, which is missing from {model_dir}")
            files.append(shard)
    elif single.is_file():
        files = [single]
    else:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        if pickles:
            raise UserError(
                str(model_dir),
                f"has only pickle weights ({', '.join(sorted(pickles))}); vtprune loads safetensors only, since unpickling "
                "can run arbitrary code. Convert them with a trusted tool and save with safe_serialization=True",
            )
        raise UserError(str(model_dir), "no model.safetensors or model.safetensors.index.json: expected safetensors weights")
    for f in files:
        read_header(f)
    return files


def load_llava(model_dir: str | Path | None = None, dtype=None):
    """A `transformers.LlavaForConditionalGeneration` in eval mode, eager attention, from a checked folder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    read_config(model_dir)
    files = weight_files(model_dir)
    with _quiet_transformers():  # its load report is several lines; what matters becomes one UserError below
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(
                model_dir,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=False,
                attn_implementation="eager",
                dtype=dtype or torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, naming the tensor, both shapes and its file
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise UserError(str(model_dir), f"could not load the checkpoint: {str(e).splitlines()[0]}") from None
    mismatched = sorted(info.get("mismatched_keys", []))
    if mismatched:
        key, found, needed = mismatched[0]
        raise UserError(
            str(_file_holding(key, files) or model_dir),
            f"tensor {key} has shape {list(found)}, but config.json needs {list(needed)} "
            f"({len(mismatched)} tensor(s) disagree with config.json)",
        )
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        raise UserError(str(model_dir), f"weights are missing {len(missing)} tensors the config needs (first: {missing[0]})")
    return model.eval()


class ModelFolder:
    """A checked llava-hf folder: config and weights checked when opened (before torch is imported), the prompt
    tokenizer and the preprocessing read when first asked for, the reference built by `reference()`."""

    def __init__(self, model_dir: str | Path | None = None):
        self.root = Path(model_dir) if model_dir is not None else default_model_dir()
        from vtprune.models.weights import CheckpointWeights

        self.config = read_config(self.root)
        self.weights = CheckpointWeights.open(self.root)  # headers checked, and against config.json

    @functools.cached_property
    def tokenizer(self) -> PromptTokenizer:
        config = self.root / "tokenizer_config.json"
        tokenizer = PromptTokenizer.from_files(self.root / "tokenizer.json", config if config.is_file() else None)
        top = max(tokenizer.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        vocab = text_dims(self.config)["vocab_size"]
        if top >= vocab:  # an id past the embedding table would index out of it in the reference
            raise UserError(str(self.root / "tokenizer.json"), f"the tokenizer produces ids up to {top}; config.json's "
                                                               f"vocab_size is {vocab}")
        return tokenizer

    @functools.cached_property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_model_folder(self.root)

    def reference(self, prune, quantize: Callable | None = None):
        """The PyTorch reference (`PrunedLlava`) with these pruning knobs; `quantize` transforms the transformers
        model first (bitsandbytes, from vtprune.quant.bnb: a layer above, so it is passed in)."""
        from vtprune.models.reference import PrunedLlava

        hf = load_llava(self.root)
        if quantize is not None:
            hf = quantize(hf)
        if self.tokenizer.image_token_id != hf.config.image_token_id:
            raise UserError(str(self.root / "tokenizer.json"), f"image token id {self.tokenizer.image_token_id} differs "
                                                               f"from config.json's image_token_id {hf.config.image_token_id}")  # fmt: skip
        return PrunedLlava(hf, prune)  # a prune_layer deeper than the feature layer is a UserError there


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off while loading, and its progress bar too unless a person watches stderr."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _file_holding(key: str, files: list[Path]) -> Path | None:
    """The safetensors file whose header lists `key` (a checkpoint may store it under a legacy prefix)."""
    for f in files:
        header = read_header(f)
        if any(name == key or name.endswith("." + key) or key.endswith("." + name) for name in header):
            return f
    return None


# ----------------------------------------------------------------------------------------- Hugging Face ids

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # ORG/NAME, optionally @revision
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]  # no pickles (*.bin, *.pt)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(name: str, download: bool = False) -> Path:
    """`--model`: an existing folder as given; a Hugging Face id (`llava-hf/llava-1.5-7b-hf[@rev]`) -> its snapshot
    folder in the local cache (refs/ -> snapshots/<commit>/, as huggingface_hub lays it out).

    Offline by default: a download happens only with `download=True` (`--download`) or HF_HUB_OFFLINE=0, and only
    of config, tokenizer and safetensors files."""
    if Path(name).exists() or not HUB_ID.match(name):
        return Path(name)
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if download and offline_env in ("1", "true", "yes", "on"):
        raise UserError("--download", "HF_HUB_OFFLINE=1 forbids downloads; unset it to fetch the model")
    allowed = download or offline_env in ("0", "false", "no", "off")
    repo_id, _, revision = name.partition("@")
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise UserError("--model", f"{name} looks like a Hugging Face id; resolving it needs `pip install huggingface_hub`") from None
    try:
        folder = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=not allowed,
                                   allow_patterns=HUB_FILES, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except LocalEntryNotFoundError as e:
        if not allowed:
            raise UserError("--model", f"{name} is not a folder and not in the Hugging Face cache ({cache}); "
                                       "add --download to fetch it, or give a local folder") from None
        raise UserError("--model", f"cannot download {name} (no network?): {_first_line(e)}") from None
    except RepositoryNotFoundError:
        raise UserError("--model", f"{name}: no such repository on the Hub (or it is private)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError("--model", f"cannot download {name}: {_first_line(e)}") from None
    return Path(folder)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
