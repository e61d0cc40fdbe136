"""`vtprune demo`: the embedded model's shipped bundle answers a question about a sample image with the runtime
(ONNX Runtime, both pruning stages inside the graphs; no torch), and the pruning is drawn.

The answer streams; then the figures go to stdout: visual tokens kept / 576, prompt tokens after Stage 2 and the cache
at the end, the time to the first token and the decode time per token, measured over a fixed number of decode steps
(greedy, past the answer's end: a one-word answer is one or two steps, too few to time). `--compare` runs the PyTorch
reference (the oracle, `[export]` extra) on the same input beside it: same answer, measured speed-up. Two PNGs
(matplotlib, when installed) show what Stage 1 did: the kept patches over the image, pruned ones greyed (the paper's
Fig. 6), and the sorted CLS-attention curve with its long-tail split point i* (Figs. 1 and 3).

The bundle is `models/embedded/bundle/` (exported from `models/embedded/checkpoint/` with the default pruning
config, plus its INT8 variant; a test checks it answers as a fresh export does). The sample is the bundle's
`sample.png` + `sample_question.txt` when it has them, else drawn from the data set, deterministically, and saved
beside the PNGs.

It sits at the top, beside cli.py and cli_run.py, because it is where the product starts: it may import any layer,
and imports torch and matplotlib only inside the functions that need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from vtprune.errors import UserError
from vtprune.models.embedded import data

SHIPPED_BUNDLE = Path(__file__).resolve().parent / "models" / "embedded" / "bundle"
DECODE_STEPS = 32  # decode steps timed for ms/token

SAMPLE_IMAGE = "sample.png"
SAMPLE_QUESTION = "sample_question.txt"
SAMPLE_ANSWER = "sample_answer.txt"
KEPT_PNG = "kept_patches.png"
CURVE_PNG = "cls_curve.png"


def sample_item(split: str = "test", seed: int = 0, min_objects: int = 3) -> data.Sample:
    """The demo's item: the split's first existence question (POPE-style, the paper's main benchmark) whose
    answer is "yes", in a scene with at least `min_objects` objects, so that Stage 1 has several to find.

    The rule is fixed in advance, not picked by the model's answer.
    """
    kind_index = data.KINDS.index("exist")
    for i in range(kind_index, 5000, len(data.KINDS)):  # kinds cycle: these items are existence questions
        s = data.make_sample(split, seed, i)
        if s.answer == "yes" and len(s.objects) >= min_objects:
            return s
    raise RuntimeError(f"no {split} scene with {min_objects} objects and a present object")  # not reached


def write_sample(folder: str | Path) -> tuple[Path, Path]:
    """Write sample.png, sample_question.txt (and the true answer, sample_answer.txt) into `folder`.

    For the training script to call on the model folder it ships, so that `vtprune demo` and `vtprune run`
    with no image have a sample. Each file is written under a temporary name and renamed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = sample_item()
    image = _atomic(folder / SAMPLE_IMAGE, lambda tmp: s.image.save(tmp, format="PNG"))
    question = _atomic(folder / SAMPLE_QUESTION, lambda tmp: tmp.write_text(s.question + "\n"))
    _atomic(folder / SAMPLE_ANSWER, lambda tmp: tmp.write_text(s.answer + "\n"))
    return image, question


def _atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- the two figures


def draw_kept_patches(image: np.ndarray, scores: np.ndarray, kept: list[int], path: Path) -> Path:
    """The model's input, the CLS attention over it, and the kept patches with the pruned ones greyed.

    image [H, W, 3] uint8 (what the vision tower sees, after resize and crop); scores [n] for a square grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    n = scores.shape[0]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    h, w = image.shape[:2]
    keep = np.zeros(n, bool)
    keep[kept] = True
    cell = np.kron(keep.reshape(g, g), np.ones((h // g, w // g), bool))  # [H', W'] patch mask in pixels
    mask = np.zeros((h, w), bool)
    mask[: cell.shape[0], : cell.shape[1]] = cell
    grey = (0.25 * image.astype(np.float32) + 0.75 * 215).astype(np.uint8)  # pruned patches: faded grey
    shown = np.where(mask[..., None], image, grey)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    axes[0].imshow(image)
    axes[0].set_title("input")
    # the scores are heavy-tailed: a square-root scale shows the tail as well as the head
    heat = axes[1].imshow(scores.reshape(g, g), cmap="magma", norm=PowerNorm(0.5), extent=(0, w, h, 0), interpolation="nearest")
    axes[1].set_title("CLS attention (Stage-1 scores, sqrt scale)")
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.03, label="attention from CLS (mean over heads)")
    axes[2].imshow(shown)
    for i in range(1, g):  # patch grid, faint
        axes[2].axhline(i * h / g, color="white", lw=0.3, alpha=0.5)
        axes[2].axvline(i * w / g, color="white", lw=0.3, alpha=0.5)
    axes[2].set_title(f"kept {len(kept)} / {n} patches")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def draw_cls_curve(scores: np.ndarray, k: int, path: Path) -> Path:
    """Sorted CLS attention d_1 >= ... >= d_n with the split point i* (paper Eq. 3) and the kept head shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.sort(scores)[::-1].astype(np.float64)  # [n]
    n = d.shape[0]
    i = np.arange(1, n + 1)
    spread = d[0] - d[-1]
    objective = (n - i) * (d[0] - d) / spread if spread > 0 else np.zeros(n)  # Eq. 3's argument, i = 1..n

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axvspan(0.5, k + 0.5, color="C3", alpha=0.12, label=f"kept head: {k} of {n}")
    ax.plot(i, d, "C0-", lw=1.6, label="sorted CLS attention $d_i$")
    ax.plot([1, n], [d[0], d[-1]], "C7:", lw=1, label="chord $d_1 \\to d_n$")
    ax.axvline(k, color="C3", lw=1.2, ls="--", label=f"split point $i^*$ = {k}")
    ax.set_xlabel("patch rank i")
    ax.set_ylabel("attention from CLS (mean over heads)")
    ax.set_xlim(0.5, n + 0.5)
    right = ax.twinx()
    right.plot(i, objective, "C2-", lw=0.9, alpha=0.6)
    right.set_ylabel("$(n-i)(d_1-d_i)/(d_1-d_n)$", color="C2")
    right.tick_params(axis="y", colors="C2")
    ax.set_title("Stage 1: long-tail split of the CLS attention")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def pixels_to_image(pixels: np.ndarray, mean, std) -> np.ndarray:
    """Undo CLIP normalisation: pixel_values [1, 3, H, W] -> [H, W, 3] uint8 (the image the model sees)."""
    x = pixels[0].transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)  # [H, W, 3]
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the command


def main(args) -> dict:
    from vtprune.cli_run import check_generation_args, generation_figures, stream_printer
    from vtprune.models.config import PruneConfig
    from vtprune.models.preprocess import preprocess_file
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    check_generation_args(args)
    if args.decode_steps < 1:
        raise UserError("--decode-steps", f"expected an integer >= 1, got {args.decode_steps}")
    if args.threads < 0:
        raise UserError("--threads", f"expected an integer >= 0 (0: all cores), got {args.threads}")
    bundle_dir = Path(args.bundle) if args.bundle else SHIPPED_BUNDLE
    if args.bundle is None and not (bundle_dir / "manifest.json").is_file():
        raise UserError(str(bundle_dir), "the embedded model's bundle is not in this install: reinstall vtprune, or "
                                         "`vtprune export --out B` and `vtprune demo --bundle B`")
    bundle = Bundle.open(bundle_dir)
    folder = None
    if args.compare:  # before anything runs: no answer printed and then a missing torch
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ModuleNotFoundError as e:
            raise UserError("--compare", f"the PyTorch reference needs {e.name}: `pip install 'vtprune[export]'` "
                                         "(see the README for torch's CPU build)") from None
    if args.compare or args.model:  # the reference beside the bundle: checked before --out is made
        from vtprune.models.loading import ModelFolder

        folder = ModelFolder(args.model)  # default: the embedded checkpoint the bundle was exported from
        if not args.compare:  # `demo --model DIR` used to run DIR's reference: say what replaced it
            raise UserError("--model", "the demo runs a bundle: export DIR (`vtprune export --model DIR --out B`) and "
                                       "run `vtprune demo --bundle B`, adding --compare --model DIR for its PyTorch reference")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError("--out", f"{out} exists and is not a folder")
    pipe = Pipeline(bundle, args.precision, args.provider, args.threads)
    out.mkdir(parents=True, exist_ok=True)
    if (bundle.root / SAMPLE_IMAGE).is_file() and (bundle.root / SAMPLE_QUESTION).is_file():
        sample_dir = bundle.root
    else:
        write_sample(out)
        sample_dir = out
    image_path = sample_dir / SAMPLE_IMAGE
    question = (sample_dir / SAMPLE_QUESTION).read_text().strip()
    truth = (sample_dir / SAMPLE_ANSWER).read_text().strip() if (sample_dir / SAMPLE_ANSWER).is_file() else None

    tokenizer = pipe.tokenizer
    pixels = preprocess_file(image_path, pipe.preprocess)  # [1, 3, H, W]
    prompt = tokenizer.build(question, pipe.template)
    prune = PruneConfig(**{**pipe.prune.to_dict()})  # the bundle's (the paper's defaults)
    stream = not args.json
    if stream:
        print(f"question: {question}")
        print("answer:   ", end="", flush=True)
    result = pipe.generate(prompt, pixels, prune, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           on_token=stream_printer(tokenizer.decode, stream))
    text = tokenizer.decode(result.token_ids)
    if stream:
        print()
        if truth is not None:
            print(f"truth:    {truth}")
    timed = pipe.generate(prompt, pixels, prune, args.decode_steps + 1, stop_at_eos=False)  # warm, fixed length
    ours = {"backend": "onnx", "precision": pipe.precision["decoder"], "provider": pipe.decoder.get_providers()[0],
            "text": text, "token_ids": result.token_ids, **timing(timed, prompt)}

    reference = None
    if args.compare:
        reference = run_reference(folder, prompt, pixels, prune, args, stream)
        reference["same_answer"] = reference["token_ids"] == result.token_ids

    n_kept = result.visual_tokens_kept
    vision_feed = {"pixel_values": pixels.astype(np.float32), "k_min": np.array(prune.k_min, np.int64)}
    _, kept_index, scores = pipe.vision.run(None, vision_feed)  # the same Stage 1 again, for its scores
    pngs = draw_figures(pixels, pipe.preprocess, scores[0], kept_index[0].tolist(), out)
    stats = {
        "bundle": str(bundle.root),
        "image": str(image_path),
        "question": question,
        "text": text,
        "token_ids": result.token_ids,
        "ground_truth": truth,
        **generation_figures(result),
        "prompt_tokens_before_stage2": prompt.length_with_image(n_kept),
        "timed": ours,
        "kept_index": result.kept_index,
        **pngs,
        "prune": prune.to_dict(),
    }
    if reference is not None:
        stats["reference"] = reference
        stats["speedup"] = {"ttft": round(reference["ttft_ms"] / ours["ttft_ms"], 2),
                            "decode": round(reference["decode_ms_per_token"] / ours["decode_ms_per_token"], 2)}
    if stream:
        print_stats(stats)
    return stats


def timing(g, prompt) -> dict:
    """TTFT and decode ms/token of one fixed-length generation (either backend's result)."""
    steps = max(len(g.token_ids) - 1, 1)
    return {"visual_tokens_kept": g.visual_tokens_kept, "prompt_tokens": g.prompt_tokens,
            "ttft_ms": round(g.vision_ms + g.prefill_ms, 2), "vision_ms": round(g.vision_ms, 2),
            "prefill_ms": round(g.prefill_ms, 2), "decode_steps": steps, "decode_ms_per_token": round(g.decode_ms / steps, 3)}


def run_reference(folder, prompt, pixels: np.ndarray, prune, args, stream: bool) -> dict:
    """The PyTorch reference on the same prompt and pixels: its answer, then the same fixed-length timing."""
    import torch

    from vtprune.models.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    if stream:
        print("reference (PyTorch) ...", file=sys.stderr, flush=True)
    model = folder.reference(prune)
    ids, pix = torch.from_numpy(prompt.input_ids)[None], torch.from_numpy(pixels)
    with torch.no_grad():
        answer = generate(model, ids, pix, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, eos_token_id=folder.tokenizer.eos_token_id)
        timed = generate(model, ids, pix, max_new_tokens=args.decode_steps + 1, eos_token_id=None)
    return {"backend": "torch", "model": str(folder.root), "text": folder.tokenizer.decode(answer.token_ids),
            "token_ids": answer.token_ids, **timing(timed, prompt)}


def draw_figures(pixels: np.ndarray, preprocess, scores: np.ndarray, kept: list[int], out: Path) -> dict:
    """Both PNGs, or none when matplotlib (the `[export]` extra) is not installed: the answer does not need it."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print("vtprune: note: the two PNGs need matplotlib (`pip install 'vtprune[export]'`); skipped", file=sys.stderr)
        return {"kept_patches_png": None, "cls_curve_png": None}
    seen = pixels_to_image(pixels, preprocess.image_mean, preprocess.image_std)
    return {"kept_patches_png": str(draw_kept_patches(seen, scores, kept, out / KEPT_PNG)),
            "cls_curve_png": str(draw_cls_curve(scores, len(kept), out / CURVE_PNG))}


def print_stats(stats: dict) -> None:
    """The figures on stdout, one per line; with --compare, the reference beside the bundle."""
    t = stats["timed"]
    rows = [("", f"bundle ({t['precision']}, ONNX Runtime)"), ("answer", stats["text"]),
            ("visual tokens kept", f"{stats['visual_tokens_kept']} / {stats['visual_tokens_total']}"),
            ("prompt tokens", f"{stats['prompt_tokens']} after Stage 2 (of {stats['prompt_tokens_before_stage2']});"
                              f" cache {stats['cache_tokens']} at the end"),
            ("TTFT", f"{t['ttft_ms']:.1f} ms (vision {t['vision_ms']:.1f} + prefill {t['prefill_ms']:.1f})"),
            ("decode", f"{t['decode_ms_per_token']:.2f} ms/token ({t['decode_steps']} steps)")]
    ref = stats.get("reference")
    if ref is not None:
        refs = ["reference (PyTorch)", ref["text"], f"{ref['visual_tokens_kept']} / {stats['visual_tokens_total']}",
                f"{ref['prompt_tokens']} after Stage 2",
                f"{ref['ttft_ms']:.1f} ms (vision {ref['vision_ms']:.1f} + prefill {ref['prefill_ms']:.1f})",
                f"{ref['decode_ms_per_token']:.2f} ms/token ({ref['decode_steps']} steps)"]
        rows = [(name, a, b) for (name, a), b in zip(rows, refs)]
    width = max(len(r[1]) for r in rows) + 2
    for r in rows:
        print(f"{r[0]:<20}{r[1]:<{width}}{r[2] if len(r) > 2 else ''}".rstrip())
    if ref is not None:
        sp = stats["speedup"]
        print(f"{'same answer':<20}{'yes' if ref['same_answer'] else 'NO'}")
        print(f"{'speed-up':<20}TTFT {sp['ttft']:.1f}x, decode {sp['decode']:.1f}x (bundle over reference)")
    print(f"{'peak RSS':<20}{stats['peak_rss_mb']:.0f} MB")
    if stats["kept_patches_png"]:
        print(f"kept patches: {stats['kept_patches_png']}")
        print(f"CLS curve:    {stats['cls_curve_png']}")
