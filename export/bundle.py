"""`vtprune export`: a llava-hf checkpoint -> a bundle folder the torch-free runtime can run.

bundle/
  manifest.json          what the runtime reads (and nothing else): graphs, io names, budgets, tokenizer...
  vision.onnx            pixel_values -> image_embeds [1, k, D], kept_index [1, k], cls_scores [1, n]
  decoder.onnx           inputs_embeds, position_ids, budgets, past.* -> logits, kept_positions, present.*
  embed_tokens.npy       the token embedding table [V, D] (the runtime splices the image into it)
  tokenizer.json, tokenizer_config.json, preprocessor_config.json
The folder is written under a temporary name and renamed when complete, so an interrupted export
leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from vtprune.errors import UserError
from vtprune.export.staging import clean_stale, stage_dir
from vtprune.models.weights import CheckpointWeights

FORMAT_VERSION = 1
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "sample.png", "sample_question.txt")
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# Which checkpoint tensors each graph holds (transformers names): what decides external data before tracing.
GRAPH_PREFIXES = {"vision": ("model.vision_tower.", "model.multi_modal_projector."),
                  "decoder": ("model.language_model.layers.", "model.language_model.norm.", "lm_head.")}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_onnx(proto, path: Path, threshold_bytes: int) -> list[str]:
    """Save and fully check a graph; over the threshold, weights go to `<name>.data` (ONNX external data).

    Returns the files written. The 2 GB protobuf limit makes external data mandatory for large models.
    A graph whose weights were already streamed into external data (export/streaming.py) is saved as
    it is, beside its data file.
    """
    import onnx

    streamed = sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    if streamed:
        onnx.save_model(proto, path)
        onnx.checker.check_model(str(path), full_check=True)
        return [path.name] + streamed
    try:
        external = proto.ByteSize() > threshold_bytes
    except Exception:  # protobuf cannot even size a message over 2 GB (EncodeError): external data it is
        external = True
    files = [path.name]
    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        files.append(path.name + ".data")
    else:
        onnx.save_model(proto, path)
    onnx.checker.check_model(str(path), full_check=True)
    return files


def export_bundle(model_dir: Path, out: Path, prune, opset: int = 24, threshold_mb: float = 256, fp16: bool = False,
                  decoder_form: str = "fused") -> dict:
    """decoder_form: "fused" (ONNX opset 24's Attention, RotaryEmbedding, RMSNormalization, Swish), "portable"
    (standard ops decomposed, opset >= 18), "ort" (ONNX Runtime's contrib attention; both export/ort_ops.py) or
    "inplace" (standard ops, the cache as fixed buffers written in place; export/inplace.py)."""
    import onnx

    from vtprune.export.eviction_op import MIN_OPSET
    from vtprune.models.loading import context_length, read_config, sliding_window

    out = Path(out)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserError("--opset", f"expected {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the ai.vtprune functions need "
                                   f">= {MIN_OPSET}; this onnx knows up to {onnx.defs.onnx_opset_version()}), got {opset}")
    from vtprune.export.decoder import FUSED_OPSET

    if decoder_form == "fused" and opset < FUSED_OPSET:
        raise UserError("--opset", f"the fused decoder form needs >= {FUSED_OPSET} (ONNX's Attention, RotaryEmbedding, "
                                   f"RMSNormalization and Swish), got {opset}; for an older runtime export --decoder-form portable")
    if decoder_form == "inplace" and prune.policy == "vfloor":
        raise UserError("--decoder-form", "inplace supports the policies h2o, snapkv and tova; export vfloor with another form")
    if out.exists():
        raise UserError("--out", f"{out} exists; expected a new folder (remove it or choose another name)")
    if not out.parent.is_dir():
        raise UserError("--out", f"the parent folder {out.parent} does not exist")
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(str(model_dir / "tokenizer.json"), "missing: a bundle needs the checkpoint's tokenizer and preprocessor files")
    from vtprune.models.preprocess import PreprocessConfig, image_processor_dict

    PreprocessConfig.from_model_folder(model_dir)  # checked now; a transformers 5 folder holds it in processor_config.json
    config = read_config(model_dir)
    weights = CheckpointWeights.open(model_dir)  # every shard's header, against the index: before torch loads

    import torch
    from tqdm import tqdm

    from vtprune.export.decoder import export_decoder
    from vtprune.export.fp16 import to_fp16, to_fp16_external
    from vtprune.export.io_names import VISION_OUTPUTS, decoder_inputs, decoder_outputs, vision_inputs
    from vtprune.export.streaming import DataWriter, Weight, attach_external, attach_inline, fake_llava
    from vtprune.export.vision import export_vision

    try:  # before the model loads, so an unwritable --out fails in a second, not after minutes
        clean_stale(out.parent)  # folders of exports that were killed
        tmp = stage_dir(out.parent, out.name)
    except OSError as e:
        raise UserError("--out", f"cannot write in {out.parent}: {e.strerror}") from None
    try:
        model = fake_llava(model_dir, prune)  # no weight in memory: each is read from its shard when written
        text = model.config.text_config
        num_layers = len(model.lm.layers)
        threshold = int(threshold_mb * 1024 * 1024)
        steps = tqdm(total=4 + 2 * fp16, desc="export", unit="step", disable=None)
        graphs: dict[str, dict] = {}
        with torch.no_grad(), _quiet_exporter():
            for name, build in (("vision", export_vision), ("decoder", partial(export_decoder, form=decoder_form))):
                steps.set_postfix_str(f"{name} graph")
                external = weights.nbytes(GRAPH_PREFIXES[name], itemsize=4) > threshold
                recipes: dict[int, Weight] = {}  # offset in <name>.onnx.data -> the checkpoint tensor written there
                with contextlib.ExitStack() as stack:
                    if external:  # each weight streamed from its shard into <name>.onnx.data
                        writer = stack.enter_context(DataWriter(tmp, f"{name}.onnx.data"))
                        bar = stack.enter_context(tqdm(desc=f"{name} weights", unit="tensor", disable=None, leave=False))

                        def attach(ws, writer=writer, bar=bar, recipes=recipes):
                            attach_external(ws, read=weights.tensor, writer=writer, progress=bar)
                            recipes.update((w.value.const_value.offset, w) for w in ws)
                    else:
                        attach = partial(attach_inline, read=weights.tensor)
                    proto = build(model, opset, read=weights.tensor, attach=attach)
                half = to_fp16(proto) if fp16 and not external else None  # before saving: that may move data out
                graphs[name] = {"fp32": graph_entry(tmp, save_onnx(proto, tmp / f"{name}.onnx", threshold), "fp32")}
                steps.update()
                if fp16:
                    steps.set_postfix_str(f"{name} graph, fp16")
                    if external:
                        with tqdm(desc=f"{name} weights, fp16", unit="tensor", disable=None, leave=False) as bar:
                            half = to_fp16_external(proto, tmp, f"{name}.fp16.onnx.data", progress=bar,
                                                    half=partial(_stored_half, weights, recipes))
                    files = save_onnx(half, tmp / f"{name}.fp16.onnx", threshold // 2)
                    graphs[name]["fp16"] = graph_entry(tmp, files, "fp16", providers=("CUDAExecutionProvider",))
                    steps.update()
                del proto, half
            steps.set_postfix_str("embeddings")
            _save_npy(tmp / "embed_tokens.npy", weights.tensor("model.language_model.embed_tokens.weight"))
            steps.update()
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        if not (tmp / "preprocessor_config.json").is_file():  # transformers 5 layout: the nested image processor
            (tmp / "preprocessor_config.json").write_text(json.dumps(image_processor_dict(model_dir), indent=2))
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": {"path": str(model_dir), "config_sha256": sha256(model_dir / "config.json")},
            "opset": opset,
            "prune": prune.to_dict(),
            "decoder_form": decoder_form,
            "model": {
                "num_layers": num_layers,
                "hidden_size": text.hidden_size,
                "num_kv_heads": text.num_key_value_heads,
                "head_dim": head_dim,
                "vocab_size": text.vocab_size,
                "context_length": context_length(config),  # a Mistral's sliding window, when shorter
                "sliding_window": sliding_window(config),
                "num_patches": model.num_patches,
                "image_size": config["vision_config"].get("image_size", 224),
                "image_token_id": model.image_token_id,
            },
            "graphs": graphs,
            "io": {
                "vision": {"inputs": vision_inputs(config["vision_config"].get("image_size", 224)), "outputs": VISION_OUTPUTS},
                "decoder": {"inputs": decoder_inputs(num_layers, image_span=prune.policy == "vfloor", slots=decoder_form == "inplace"),
                            "outputs": decoder_outputs(num_layers, slots=decoder_form == "inplace")},
            },
            "embed_tokens": {"file": "embed_tokens.npy", "sha256": sha256(tmp / "embed_tokens.npy"),
                             "shape": [text.vocab_size, text.hidden_size], "dtype": "float32"},
            "tokenizer": {"file": "tokenizer.json", "config": "tokenizer_config.json" if (tmp / "tokenizer_config.json").is_file() else None},
            "preprocessor": "preprocessor_config.json",
            "prompt_template": PROMPT_TEMPLATE,
            "sample": {"image": "sample.png", "question": "sample_question.txt"} if (tmp / "sample.png").is_file() else None,
            "generation": {"max_new_tokens": 64, "eos_token_id": text.eos_token_id, "bos_token_id": text.bos_token_id},
        }
        write_manifest(tmp, manifest)
        steps.update()
        steps.close()
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out)
    except OSError as e:  # disk full, quota, a folder made read-only meanwhile: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError("--out", f"could not write the bundle in {out.parent}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _stored_half(weights: CheckpointWeights, recipes: dict[int, "Weight"], tensor) -> np.ndarray | None:
    """An fp32 initializer's fp16 data straight from a checkpoint that stores it in fp16 (as llava-hf does):
    the values ORT's converter would give (fp16 values are in fp16's range), without reading the fp32 copy
    back and converting it again. None for other dtypes. `recipes` says which checkpoint tensor was written
    at each offset of the fp32 data (the initializers are renamed when graphs are composed; offsets are not)."""
    offset = next((int(e.value) for e in tensor.external_data if e.key == "offset"), 0)
    w = recipes.get(offset)
    if w is None or any(weights.info(s).dtype != "F16" for s in w.sources):
        return None
    a = w.array(partial(weights.tensor, dtype=np.float16))
    return a if a.shape == tuple(tensor.dims) else None


def _save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array.astype(np.float32, copy=False))


def graph_entry(folder: Path, files: list[str], precision: str, providers=("CUDAExecutionProvider", "CPUExecutionProvider")) -> dict:
    return {
        "file": files[0],
        "external_data": files[1] if len(files) > 1 else None,
        "sha256": {name: sha256(folder / name) for name in files},
        "precision": precision,
        "providers": list(providers),
    }


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's known noise off (a torchvision notice per graph, shape-naming and pytree deprecation warnings),
    so the terminal shows the progress bar, and a failure stays one line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")
        try:
            yield
        finally:
            logger.setLevel(level)


def write_manifest(folder: Path, manifest: dict) -> None:
    """manifest.json, written whole under a temporary name and then renamed."""
    tmp = folder / "manifest.json.tmp"
    try:
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, folder / "manifest.json")
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write: the old manifest stays whole


def main(args) -> dict:
    from vtprune.models.config import prune_config_from_args
    from vtprune.models.loading import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    manifest = export_bundle(model_dir, Path(args.out), prune_config_from_args(args), args.opset,
                             args.external_data_threshold_mb, fp16=args.fp16, decoder_form=args.decoder_form)
    sizes = {f"{g}.{p}": sum((Path(args.out) / f).stat().st_size for f in v["sha256"])
             for g, variants in manifest["graphs"].items() for p, v in variants.items()}
    result = {"bundle": str(args.out), "format_version": FORMAT_VERSION, "opset": args.opset, "bytes": sizes}
    if not args.json:
        print(f"wrote {args.out}: " + ", ".join(f"{name} {b / 1e6:.1f} MB" for name, b in sizes.items()))
    return result
