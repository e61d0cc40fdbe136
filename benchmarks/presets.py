"""The models `vtprune bench` times, and the artefacts built from them, cached so a second run starts at once.

Presets:
- `embedded`: the shipped model (`default_model_dir()`); until it exists, a tiny random LLaVA stands in
  (said so in the results);
- `llava-cpu-1b`: LLaVA-shaped random weights from `models/shapes.py` (the real CLIP ViT-L/14-336 tower
  with TinyLlama-1.1B's text shapes), big enough that compute, not Python, dominates on a CPU;
- `llava-1.5-7b`: the same at LLaVA-1.5-7B's shapes (28 GB in fp32: a GPU's job).
Random weights give no meaningful Stage-1 split, so their timings pin k (see `pinned_k`).

Per model, under ~/.cache/vtprune/presets/<key>/: `model/` (llava-hf checkpoint), `bundle/` (vtprune
export, plus int8/int4 variants where `vtprune quantize` can make them), `llama/` (the text part as a
LlamaForCausalLM checkpoint) and `genai/` (the peer: ONNX Runtime GenAI's model builder on `llama/`).
Each is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vtprune.errors import UserError
from vtprune.models.shapes import ModelShape, preset as shape_preset

PRESETS = ("embedded", "llava-cpu-1b", "llava-1.5-7b")
PAPER_K, PAPER_N = 127, 576  # the paper's average visual tokens kept of LLaVA-1.5's 576
TINY_EMBEDDED_STANDIN = dict(vision_hidden=64, vision_layers=6, vision_heads=4, text_hidden=64, text_layers=2,
                             text_heads=4, kv_heads=2, intermediate=128, vocab=256)


@dataclass(frozen=True)
class BenchModel:
    preset: str
    model_dir: Path
    cache: Path  # where this model's bundle / peer artefacts live
    random_weights: bool
    note: str


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vtprune" / "presets"


def resolve(preset: str, model_dir: str | None = None) -> BenchModel:
    """The checkpoint a bench run uses, built on first use for the random-weight presets."""
    from vtprune.models.loading import default_model_dir, read_config

    if model_dir is not None:
        path = Path(model_dir)
        read_config(path)
        return BenchModel("custom", path, cache_root() / f"model-{_dir_key(path)}", False,
                          f"checkpoint {path} (--model)")
    if preset not in PRESETS:
        raise UserError("--preset", f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if preset == "embedded":
        shipped = default_model_dir()
        if (shipped / "config.json").is_file():
            return BenchModel("embedded", shipped, cache_root() / f"embedded-{_dir_key(shipped)}", False,
                              "the shipped embedded model")
        root = cache_root() / "embedded-standin"
        _build_once(root / "model", lambda tmp: save_random_llava(tmp, tiny_standin_shape()))
        return BenchModel("embedded", root / "model", root, True,
                          f"the embedded model is not in the package yet ({shipped} is missing): a tiny random "
                          "LLaVA of the same token geometry stands in")
    if preset == "llava-1.5-7b":  # llava-hf/llava-1.5-7b-hf's exact shapes and layout, random fp16 weights
        root = cache_root() / preset
        build_llava_7b(root / "model")
        return BenchModel(preset, root / "model", root, True,
                          "random fp16 weights at llava-hf/llava-1.5-7b-hf's shapes and layout (presets.save_llava_7b)")
    root = cache_root() / preset
    _build_once(root / "model", lambda tmp: save_random_llava(tmp, shape_preset(preset)))
    return BenchModel(preset, root / "model", root, True,
                      f"random weights at {preset}'s shapes (models/shapes.py), seed 0")


def pinned_k(num_patches: int) -> int:
    """The paper's average share of kept visual tokens (127 of 576), at this model's patch count."""
    return max(1, round(num_patches * PAPER_K / PAPER_N))


def tiny_standin_shape() -> ModelShape:
    """LLaVA-1.5's token geometry (336 px, patch 14: 576 patches) at toy widths: the embedded model's stand-in."""
    from vtprune.models.shapes import TextShape, VisionShape

    t = TINY_EMBEDDED_STANDIN
    return ModelShape("embedded-standin",
                      VisionShape(image_size=336, patch_size=14, hidden=t["vision_hidden"], layers=t["vision_layers"],
                                  heads=t["vision_heads"], intermediate=t["intermediate"]),
                      TextShape(hidden=t["text_hidden"], layers=t["text_layers"], heads=t["text_heads"],
                                kv_heads=t["kv_heads"], intermediate=t["intermediate"], vocab=t["vocab"]))


# ---------------------------------------------------------------------------------- checkpoints

def llava_config(shape: ModelShape):
    """A `LlavaConfig` at `shape`'s sizes: CLIP (quick_gelu), 2-layer GELU projector, Llama with GQA. 4,096
    positions as LLaVA-1.5's Vicuna has, so a 2,048-token answer fits after the prompt (the long-generation bench)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = shape.vision, shape.text
    vision = CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                              num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                              projection_dim=768)
    text = LlamaConfig(hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
                       num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, vocab_size=t.vocab,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=t.tied_embeddings)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=t.vocab - 1,
                       vision_feature_layer=shape.feature_layer, vision_feature_select_strategy="default")


def save_random_llava(path: Path, shape: ModelShape, seed: int = 0) -> None:
    """A random-weight LLaVA in the llava-hf layout, with a word-level tokenizer of the same vocabulary."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(shape)).eval()
    model.save_pretrained(path)
    del model
    save_word_tokenizer(path, shape.text.vocab, shape.vision.image_size)


# llava-hf/llava-1.5-7b-hf's config.json as that repository writes it: the text model's sizes are left to
# LlamaConfig's defaults (hidden 4096, 32 layers, 32 heads, intermediate 11008), the legacy key names.
LLAVA_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
SHARDS = 3


def save_llava_7b(path: Path, text_layers: int | None = None, seed: int = 0, progress=None) -> None:
    """Random weights at exactly llava-hf/llava-1.5-7b-hf's shapes, in its layout: its config.json, fp16
    safetensors in three shards with model.safetensors.index.json (legacy tensor names), a 32064-token
    tokenizer (<image> 32000, <pad> 32001), a CLIP preprocessor config. Written one shard at a time: the
    model is never whole in memory (peak ~ one shard, 4.7 GB). `text_layers` makes a shallower variant at
    the same widths (the parity tests' 2-layer model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vtprune.models.weights import legacy_name

    config = json.loads(json.dumps(LLAVA_7B_CONFIG))
    if text_layers is not None:
        config["text_config"]["num_hidden_layers"] = text_layers
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlavaForConditionalGeneration(hf_config).state_dict().items()}
    names = [legacy_name(n) for n in shapes]
    sizes = [2 * int(torch.Size(s).numel()) for s in shapes.values()]
    bounds, total, acc = [], sum(sizes), 0
    for i, size in enumerate(sizes):  # contiguous shards of about total / SHARDS bytes
        acc += size
        if len(bounds) < SHARDS - 1 and acc >= total * (len(bounds) + 1) / SHARDS:
            bounds.append(i + 1)
    spans = list(zip([0] + bounds, bounds + [len(names)]))
    weight_map = {}
    for k, (lo, hi) in enumerate(spans):
        file = f"model-{k + 1:05d}-of-{len(spans):05d}.safetensors"
        tensors = {names[i]: _random_tensor(names[i], shape, seed) for i, shape in enumerate(shapes.values()) if lo <= i < hi}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
        if progress is not None:
            progress.update(1)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    save_word_tokenizer(path, 32064, 336, image_id=32000, pad_id=32001)


def build_llava_7b(target: Path, text_layers: int | None = None) -> None:
    """The 7B preset checkpoint in the cache, built once under a temporary name; refused up front when the
    disk cannot hold it (14 GB at 32 layers)."""
    from tqdm import tqdm

    need = 14.2e9 * ((text_layers or 32) + 3) / 35  # ~0.4 GB per layer + vision, embeddings and head
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < need * 1.05:
        raise UserError(str(target.parent), f"{free / 1e9:.1f} GB free; the llava-1.5-7b checkpoint needs {need / 1e9:.1f} GB")
    with tqdm(total=SHARDS, desc="llava-1.5-7b checkpoint", unit="shard", disable=None) as bar:
        _build_once(target, lambda tmp: save_llava_7b(tmp, text_layers, progress=bar))


def _random_tensor(name: str, shape: tuple, seed: int):
    """N(0, 0.02) weights (transformers' initializer_range), norms at 1, biases at 0; fp16, seeded per tensor."""
    import torch

    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.float16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.float16)


WORDS = ["USER", "ASSISTANT", ":", "?", ".", ",", "what", "is", "are", "there", "in", "the", "image", "a", "an", "of",
         "how", "many", "which", "colour", "color", "shape", "left", "right", "top", "bottom", "centre", "describe",
         "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "diamond", "cross",
         "small", "medium", "large", "yes", "no", "and", "at", "to", "objects", "object", "any"]


def save_word_tokenizer(path: Path, vocab: int, image_size: int, image_id: int | None = None, pad_id: int = 0) -> None:
    """tokenizer.json (+ config) and a CLIP preprocessor_config.json for a random checkpoint.

    Word-level, `vocab` tokens: <s> 1, </s> 2, <pad> at `pad_id`, <image> at `image_id` (default vocab - 1,
    as `llava_config` sets it), <unk> at 3 (or 0 when <pad> is elsewhere, LLaMA's order), then WORDS and
    filler words in the free ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    image_id = vocab - 1 if image_id is None else image_id
    fixed = {1: "<s>", 2: "</s>", pad_id: "<pad>", image_id: "<image>", (3 if pad_id == 0 else 0): "<unk>"}
    words = iter(WORDS + [f"w{i}" for i in range(vocab)])
    tokens = [fixed[i] if i in fixed else next(words) for i in range(vocab)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "image_token": "<image>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
         "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True, "do_convert_rgb": True,
         "resample": 3, "rescale_factor": 1 / 255, "image_processor_type": "CLIPImageProcessor",
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))


def save_text_model(model_dir: Path, out: Path) -> None:
    """The LLaVA's language model + lm_head as a `LlamaForCausalLM` checkpoint (what the peer's builder reads).

    Tensors are renamed, not recomputed: `model.language_model.*` -> `model.*`, `lm_head.*` kept; one source
    shard in memory at a time (a 7B model's text part is 13 GB in fp16)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vtprune.models.loading import read_config, weight_files

    config = read_config(model_dir)
    files = weight_files(model_dir)
    weight_map = {}
    for k, f in enumerate(files):
        name = "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        with safe_open(str(f), framework="pt") as fh:
            tensors = {_text_key(key): fh.get_tensor(key) for key in fh.keys() if _text_key(key) is not None}
        if tensors:
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in tensors})
        del tensors
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    text = dict(config["text_config"])
    text.update(model_type="llama", architectures=["LlamaForCausalLM"])
    text.setdefault("torch_dtype", "float32")
    (out / "config.json").write_text(json.dumps(text, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, out / name)


# llava-hf files name the text model `language_model.model.*` / `language_model.lm_head.*`; transformers'
# in-memory layout (and some re-saved checkpoints) `model.language_model.*` / `lm_head.*`.
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}


def _text_key(key: str) -> str | None:
    """The LlamaForCausalLM name of a LLaVA checkpoint tensor, or None for the vision tower and projector."""
    for prefix, renamed in _TEXT_PREFIXES.items():
        if key.startswith(prefix):
            return renamed + key[len(prefix):]
    return None


# ---------------------------------------------------------------------------------- bundles

def ensure_bundle(model: BenchModel, quantize: tuple[str, ...] = ("int8", "int4")) -> tuple[Path, dict[str, str]]:
    """The model's vtprune bundle (exported with the paper's pruning config), and for each precision in
    `quantize` that the bundle lacks, an attempt with `vtprune quantize`. Returns (bundle, {precision:
    why it is missing}) for the variants that could not be made."""
    bundle = model.cache / "bundle"
    if not (bundle / "manifest.json").is_file():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(bundle, ignore_errors=True)
        _vtprune("export", "--model", str(model.model_dir), "--out", str(bundle))
    missing = {}
    for precision in quantize:
        if precision in _precisions(bundle):
            continue
        try:
            family, _, block = precision.partition("-b")  # int4-b128: int4 at block 128
            _vtprune("quantize", "--bundle", str(bundle), "--precision", family, *(("--block-size", block) if block else ()))
        except UserError as e:
            missing[precision] = e.what
        if precision not in _precisions(bundle) and precision not in missing:
            missing[precision] = "vtprune quantize did not register it in the manifest"
    return bundle, missing


def _precisions(bundle: Path) -> set[str]:
    graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
    return set(graphs.get("decoder", {}))


def _vtprune(*argv: str) -> None:
    """One vtprune command in its own process, so its memory is returned when it ends."""
    proc = subprocess.run([sys.executable, "-m", "vtprune.cli", *argv, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"vtprune {argv[0]}", f"failed while preparing the bench: {last[:400]}")


# ---------------------------------------------------------------------------------- helpers

def _build_once(target: Path, build) -> None:
    """Run build(tmp_dir) and rename tmp_dir to target, unless target is already complete."""
    if (target / "config.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dir_key(path: Path) -> str:
    """Changes when the checkpoint does: its config and the size and mtime of its weight files."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
