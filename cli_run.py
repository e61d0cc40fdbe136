"""`vtprune run`: answer a prompt about an image, on the PyTorch reference or on an ONNX bundle.

Both backends print the same JSON keys, so a user can compare them on one image.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from vtprune.errors import UserError


def main(args) -> dict:
    if args.threads < 0:
        raise UserError("--threads", f"expected an integer >= 0 (0: all cores), got {args.threads}")
    if args.bundle is not None or args.backend == "onnx":
        if args.bundle is None:
            raise UserError("--backend", "onnx needs --bundle BUNDLE (a folder written by `vtprune export`)")
        if args.bnb:
            raise UserError("--bnb", "bitsandbytes applies to the torch backend (--model), not to an ONNX bundle")
        args.precision = args.precision or "fp32"
        return run_bundle(args)
    if args.precision not in (None, "fp32"):  # it used to run the fp32 reference silently
        raise UserError("--precision", f"{args.precision} is a variant of an ONNX bundle: give --bundle B (written by "
                                       "`vtprune export`, variants added by `vtprune quantize`); the PyTorch reference "
                                       "runs fp32 (--bnb int8|nf4 quantizes its weights)")
    if args.provider is not None:
        raise UserError("--provider", "applies to an ONNX bundle (--bundle B); the PyTorch reference runs on torch's CPU")
    if getattr(args, "prefill_precision", None) is not None:
        raise UserError("--prefill-precision", "chooses a decoder variant of an ONNX bundle: give --bundle B")
    return run_torch(args)


def stream_printer(decode, enabled: bool):
    """A callback printing the text as it grows (decoding the whole answer so far keeps word joins right)."""
    tokens: list[int] = []
    shown = [""]

    def on_token(token: int) -> None:
        tokens.append(token)
        if enabled:
            text = decode(tokens)
            sys.stdout.write(text[len(shown[0]) :] if text.startswith(shown[0]) else "\n" + text)
            sys.stdout.flush()
            shown[0] = text

    return on_token


def run_torch(args) -> dict:
    from vtprune.models.config import prune_config_from_args
    from vtprune.models.loading import ModelFolder, context_length, sliding_window
    from vtprune.models.preprocess import preprocess_file
    from vtprune.models.shapes import ModelShape

    prune = prune_config_from_args(args)
    check_generation_args(args)
    # What a user can get wrong is checked before torch is imported and a weight is read (minutes on a 7B model).
    folder = ModelFolder(args.model)
    model_dir, config = folder.root, folder.config
    shape = ModelShape.from_config(config, name=str(model_dir / "config.json"))
    if prune.visual and prune.prune_layer > shape.vision_layers_run:
        raise UserError("--prune-layer", f"expected at most {shape.vision_layers_run} (the vision feature layer's depth), got {prune.prune_layer}")
    image, question = image_and_prompt(args, model_dir)
    tokenizer = folder.tokenizer
    pixels = preprocess_file(image, folder.preprocess)
    prompt = tokenizer.build(question)
    warn_vocabulary(tokenizer, question)
    context, window = context_length(config), sliding_window(config)
    check_context(prompt.length_with_image(shape.vision.num_patches), args.max_new_tokens, context, window)

    import torch

    from vtprune.models.generate import generate
    from vtprune.quant.bnb import quantize_bnb

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    model = folder.reference(prune, (lambda hf: quantize_bnb(hf, args.bnb)) if args.bnb else None)
    check_context(prompt.length_with_image(model.num_patches), args.max_new_tokens,
                  min(context, model.config.text_config.max_position_embeddings), window)

    stream = not (args.json or args.no_stream)
    result = generate(
        model,
        torch.from_numpy(prompt.input_ids).unsqueeze(0),
        torch.from_numpy(pixels),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
        on_token=stream_printer(tokenizer.decode, stream),
    )
    stats = {"backend": "torch" + (f"-bnb-{args.bnb}" if args.bnb else ""), "model": str(model_dir)}
    return report(args, stats, tokenizer.decode(result.token_ids), prompt, result, prune, stream)


def run_bundle(args) -> dict:
    """The same answer and statistics from an ONNX bundle, with no torch imported."""
    from vtprune.models.config import prune_config_from_args
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline
    from vtprune.runtime.memory import gpu_memory_mb
    from vtprune.models.preprocess import preprocess_file

    check_generation_args(args)
    bundle = Bundle.open(args.bundle)
    prune = prune_config_from_args(args)
    bundle.check_prune(prune)
    sample = bundle.sample() if args.image is None and args.prompt is None else None  # confined to the bundle
    image, question = image_and_prompt(args, bundle.root, *(sample or ("", "")))
    prefill = getattr(args, "prefill_precision", None)
    if prefill is not None and prefill not in bundle.manifest["graphs"]["decoder"]:
        have = ", ".join(sorted(bundle.manifest["graphs"]["decoder"]))
        raise UserError("--prefill-precision", f"the bundle has no {prefill!r} decoder (it has: {have}); run `vtprune quantize`")
    pipe = Pipeline(bundle, args.precision, args.provider, args.threads, prefill_precision=prefill)
    prompt = pipe.tokenizer.build(question, pipe.template)
    warn_vocabulary(pipe.tokenizer, question)
    pixels = preprocess_file(image, pipe.preprocess)
    check_context(prompt.length_with_image(pipe.model["num_patches"]), args.max_new_tokens, pipe.model["context_length"],
                  pipe.model.get("sliding_window"))
    stream = not (args.json or args.no_stream)
    result = pipe.generate(prompt, pixels, prune, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           on_token=stream_printer(pipe.tokenizer.decode, stream))
    stats = {
        "backend": "onnx",
        "bundle": str(bundle.root),
        "precision": {**pipe.precision, **({"decoder_prefill": pipe.prefill_precision} if pipe.prefill_precision else {})},
        "provider": pipe.decoder.get_providers()[0],
        "gpu_memory_mb": gpu_memory_mb() if pipe.cache_device == "cuda" else None,
    }
    return report(args, stats, pipe.tokenizer.decode(result.token_ids), prompt, result, prune, stream)


def report(args, stats: dict, text: str, prompt, result, prune, stream: bool) -> dict:
    """The JSON both backends print (same keys, so they can be compared on one image), and the human summary."""
    stats = {
        **stats,
        "text": text,
        "input_ids": prompt.input_ids.tolist(),
        "token_ids": result.token_ids,
        **generation_figures(result),
        "kept_index": result.kept_index,
        "prune": prune.to_dict(),
    }
    if not args.json:
        print() if stream else print(text)
        print_summary(stats)
    return stats


def generation_figures(result) -> dict:
    """The tokens each stage kept and the timings of one generation (either backend's result), as `run` and
    `demo` print them."""
    from vtprune.runtime.memory import peak_rss_mb

    return {
        "visual_tokens_kept": result.visual_tokens_kept,
        "visual_tokens_total": result.visual_tokens_total,
        "prompt_tokens": result.prompt_tokens,
        "cache_tokens": result.cache_tokens,
        "vision_ms": round(result.vision_ms, 3),
        "prefill_ms": round(result.prefill_ms, 3),
        "ttft_ms": round(result.vision_ms + result.prefill_ms, 3),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def vocabulary_warning(tokenizer, question: str) -> str | None:
    """For a closed (word-level) vocabulary: the words of `question` it does not know (each would become <unk>
    silently), in one line; for the embedded model, with the question forms it was trained on. None when all known."""
    tok = tokenizer.tokenizer
    if type(tok.model).__name__ != "WordLevel":
        return None  # subword vocabularies spell any word
    words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(question)] if tok.pre_tokenizer else question.split()
    unknown = list(dict.fromkeys(w for w in words if tok.token_to_id(w) is None))
    embedded = is_embedded_vocabulary(tok)
    if embedded:
        from vtprune.models.embedded.data import QUESTION_FORMS, matches_a_question_form

        forms = "the embedded model was trained on: " + " | ".join(QUESTION_FORMS) + " (its model card lists the words)"
        if not unknown and not matches_a_question_form(question.replace(tokenizer.image_token, " ")):
            return f"vtprune: warning: --prompt: {question.strip()!r} is none of the questions {forms}"
    if not unknown:
        return None
    line = f"vtprune: warning: --prompt: the model does not know {', '.join(repr(w) for w in unknown)} (each becomes <unk>)"
    return line + "; " + forms if embedded else line


def is_embedded_vocabulary(tok) -> bool:
    from tokenizers import Tokenizer

    from vtprune.models.loading import default_model_dir

    shipped = default_model_dir() / "tokenizer.json"
    return shipped.is_file() and Tokenizer.from_file(str(shipped)).get_vocab() == tok.get_vocab()


def warn_vocabulary(tokenizer, question: str) -> None:
    line = vocabulary_warning(tokenizer, question)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def check_generation_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens", f"expected an integer >= 1, got {args.max_new_tokens}")
    if not (0 <= args.temperature < math.inf):
        raise UserError("--temperature", f"expected a finite number >= 0, got {args.temperature}")
    if not (0 < args.top_p <= 1):
        raise UserError("--top-p", f"expected a number in (0, 1], got {args.top_p}")
    if args.seed < 0:
        raise UserError("--seed", f"expected an integer >= 0, got {args.seed}")


I64 = 2**63  # budgets, k_min, seeds and token counts become int64 graph inputs or numpy seeds
# Every numeric option of every command: dest -> (kind, low, high, low inclusive). Checked once the command line
# parses, before any module of the command is imported; an option a command lacks, or left at None, is skipped.
VALUE_RANGES = {
    "max_new_tokens": ("int", 1, 1 << 24, True), "seed": ("int", 0, I64, True), "threads": ("int", 0, 4096, True),
    "heavy_budget": ("int", 0, I64, True), "recent_budget": ("int", 0, I64, True), "k_min": ("int", 1, I64, True),
    "prune_layer": ("int", 1, 1 << 16, True), "snap_window": ("int", 1, I64, True), "decode_steps": ("int", 1, 1 << 24, True),
    "limit": ("int", 1, I64, True), "tokens": ("int", 1, I64, True), "calibration_samples": ("int", 1, 1 << 20, True),
    "repeats": ("int", 1, 1 << 20, True), "samples": ("int", 1, 1 << 20, True), "batch_size": ("int", 1, 1 << 16, True),
    "eval_n": ("int", 1, 1 << 24, True), "instances": ("int", 1, 1024, True), "queue_size": ("int", 1, 1 << 20, True),
    "port": ("int", 1, 65536, True), "visual_tokens": ("int", 0, 1 << 24, True), "text_tokens": ("int", 0, 1 << 24, True),
    "new_tokens": ("int", 0, 1 << 24, True), "turns": ("int", 1, 1 << 16, True),
    "alpha": ("unit", 0.0, 1.0, False), "heavy_ratio": ("unit", 0.0, 1.0, True), "recent_ratio": ("unit", 0.0, 1.0, True),
    "visual_floor": ("unit", 0.0, 1.0, True), "vision_share": ("unit", 0.0, 1.0, True), "pooled_share": ("unit", 0.0, 1.0, True),
    "drop_share": ("unit", 0.0, 1.0, True), "top_p": ("unit", 0.0, 1.0, False),
    "minutes": ("positive", 0.0, 1e6, False), "eval_every": ("positive", 0.0, 1e6, False),
    "external_data_threshold_mb": ("positive", 0.0, 1e9, False),
}
MIN_TEMPERATURE = 1e-3  # below it logits / T overflows float64 (1e-310 made every probability NaN)


def check_values(args) -> None:
    """Every numeric option in range (64-bit limits included), the prompt valid UTF-8, and an --out that names a
    file refused for commands that write a folder: one UserError naming the option, before the command runs."""
    for dest, (kind, low, high, low_inclusive) in VALUE_RANGES.items():
        value = getattr(args, dest, None)
        option = "--" + dest.replace("_", "-")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent, or a choice of this command (chat's --turns is a word)
        if kind == "int":
            if not low <= value < high:
                raise UserError(option, f"expected an integer >= {low} (and below {high}), got {value}")
        elif kind == "unit":
            ok = (low <= value if low_inclusive else low < value) and value <= high
            if not ok or math.isnan(value):
                raise UserError(option, f"expected a number in {'[' if low_inclusive else '('}0, 1], got {value}")
        elif not (low < value < high) or math.isnan(value):
            raise UserError(option, f"expected a finite number > 0 (and below {high:g}), got {value}")
    temperature = getattr(args, "temperature", None)
    if isinstance(temperature, float) and temperature != 0 and not (MIN_TEMPERATURE <= temperature < math.inf):
        raise UserError("--temperature", f"expected 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}")
    prompt = getattr(args, "prompt", None)
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
            raise UserError("--prompt", "expected UTF-8 text; the argument holds bytes that are not UTF-8") from None
    out = getattr(args, "out", None)
    if out and args.command in ("bench", "quantize", "eval", "demo") and Path(out).exists() and not Path(out).is_dir():
        raise UserError("--out", f"{out} is a file; expected a folder (new, or one this command wrote)")


def check_context(prompt_tokens: int, max_new_tokens: int, context: int, window: int | None = None) -> None:
    """The prompt (the image's tokens included) and the whole answer must fit in the model's context (`window`: a
    Mistral sliding window bounds it; vtprune attends to the whole cache, so it refuses to run past the window)."""
    what = (f"the model's sliding attention window is {window} tokens (vtprune attends to the whole cache, so it does "
            "not run past the window)") if window else f"the model's context is {context}"
    if prompt_tokens > context:
        raise UserError("--prompt", f"the prompt is {prompt_tokens} tokens with the image; {what}")
    if prompt_tokens + max_new_tokens > context:
        raise UserError("--max-new-tokens", f"expected at most {context - prompt_tokens}: the prompt is {prompt_tokens} "
                                            f"tokens with the image and {what}")


def image_and_prompt(args, folder: Path, sample_image="sample.png", sample_question="sample_question.txt") -> tuple[Path, str]:
    """The image and question given, or the model's (or bundle's) sample when both are omitted."""
    if args.image is None and args.prompt is None:
        sample = folder / sample_image
        question = folder / sample_question
        if sample.is_file() and question.is_file():
            try:
                return sample, question.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(str(question), f"expected a UTF-8 text file holding the sample question: {e}") from None
    if args.image is None:
        raise UserError("--image", "expected the path of an image file")
    if args.prompt is None:
        raise UserError("--prompt", "expected a question about the image")
    return Path(args.image), args.prompt


def print_summary(stats: dict, file=None) -> None:
    """One line of figures (stderr by default, dimmed on a terminal); plain print, so the runtime path needs no
    library beyond the runtime's own."""
    file = sys.stderr if file is None else file
    line = (f"visual tokens {stats['visual_tokens_kept']}/{stats['visual_tokens_total']} · "
            f"LLM prompt {stats['prompt_tokens']} tokens · cache {stats['cache_tokens']} · "
            f"vision {stats['vision_ms']:.1f} ms · prefill {stats['prefill_ms']:.1f} ms · "
            f"decode {stats['decode_tokens_per_s']:.1f} tok/s · peak RSS {stats['peak_rss_mb']:.0f} MB"
            + (f" · GPU {stats['gpu_memory_mb']:.0f} MB" if stats.get("gpu_memory_mb") else ""))
    dim = file.isatty() and not os.environ.get("NO_COLOR")
    print(f"\033[2m{line}\033[0m" if dim else line, file=file, flush=True)
