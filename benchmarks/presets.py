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
    if preset == "llava-1.5-7b":  # every system here runs on the CPU provider: a 7B fp32 model does not fit
        why = "there is no CUDA here" if not _cuda_available() else "the bench does not drive a GPU yet"
        raise UserError("--preset", f"llava-1.5-7b (28 GB in fp32) needs the GPU path of the bench, and {why}; "
                                    "on a CPU use llava-cpu-1b, or `vtprune roofline --preset llava-1.5-7b` for predictions")
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
    """A `LlavaConfig` at `shape`'s sizes: CLIP (quick_gelu), 2-layer GELU projector, Llama with GQA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = shape.vision, shape.text
    vision = CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                              num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                              projection_dim=768)
    text = LlamaConfig(hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
                       num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, vocab_size=t.vocab,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
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


WORDS = ["USER", "ASSISTANT", ":", "?", ".", ",", "what", "is", "are", "there", "in", "the", "image", "a", "an", "of",
         "how", "many", "which", "colour", "color", "shape", "left", "right", "top", "bottom", "centre", "describe",
         "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "diamond", "cross",
         "small", "medium", "large", "yes", "no", "and", "at", "to", "objects", "object", "any"]


def save_word_tokenizer(path: Path, vocab: int, image_size: int) -> None:
    """tokenizer.json (+ config) and a CLIP preprocessor_config.json for a random checkpoint.

    Word-level: ids 0-3 are <pad> <s> </s> <unk>, then WORDS, then filler words up to `vocab`, and
    the image token last (id vocab - 1, as `llava_config` sets it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS
    tokens += [f"w{i}" for i in range(vocab - 1 - len(tokens))] + ["<image>"]
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

    Tensors are renamed, not recomputed: `model.language_model.*` -> `model.*`, `lm_head.*` kept."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from vtprune.models.loading import read_config, weight_files

    config = read_config(model_dir)
    tensors = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():
                name = _text_key(key)
                if name is not None:
                    tensors[name] = fh.get_tensor(key)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
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
            _vtprune("quantize", "--bundle", str(bundle), "--precision", precision)
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
