"""`vtprune demo`: the embedded model answers a question about a sample image, and the pruning is drawn.

The answer streams as `vtprune run` streams it (the same printer and summary line); then two PNGs show what
Stage 1 did: the kept patches over the image, pruned ones greyed (the paper's Fig. 6), and the sorted
CLS-attention curve with its long-tail split point i* (Figs. 1 and 3).

The sample is the model folder's `sample.png` + `sample_question.txt` when it has them (`write_sample` puts
them there; `vtprune run` with no --image/--prompt uses the same pair); otherwise it is drawn from the data set
at demo time, deterministically, and saved beside the PNGs.

It sits at the top, beside cli.py and cli_run.py, because it is where the product starts: it uses the run
command's printer and summary line and runs the reference on the embedded model, so it may import any layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vtprune.errors import UserError
from vtprune.models.embedded import data

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
    axes[1].imshow(scores.reshape(g, g), cmap="magma", norm=PowerNorm(0.5), extent=(0, w, h, 0), interpolation="nearest")
    axes[1].set_title("CLS attention (Stage-1 scores, sqrt scale)")
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
    import torch

    from vtprune.cli_run import check_generation_args, generation_figures, print_summary, stream_printer
    from vtprune.models.config import PruneConfig
    from vtprune.models.generate import generate
    from vtprune.models.loading import ModelFolder, default_model_dir
    from vtprune.models.preprocess import preprocess_file

    check_generation_args(args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file() and args.model is None:
        raise UserError(str(model_dir), "the embedded model is not in this install: train it with `vtprune train`, or reinstall vtprune")
    folder = ModelFolder(model_dir)  # checked before --out is made: a failure leaves no folder
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError("--out", f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if (model_dir / SAMPLE_IMAGE).is_file() and (model_dir / SAMPLE_QUESTION).is_file():
        sample_dir = model_dir
    else:
        write_sample(out)
        sample_dir = out
    image_path = sample_dir / SAMPLE_IMAGE
    question = (sample_dir / SAMPLE_QUESTION).read_text().strip()
    truth = (sample_dir / SAMPLE_ANSWER).read_text().strip() if (sample_dir / SAMPLE_ANSWER).is_file() else None

    tokenizer, preprocess = folder.tokenizer, folder.preprocess
    pixels = preprocess_file(image_path, preprocess)  # [1, 3, H, W]
    prompt = tokenizer.build(question)
    prune = PruneConfig()  # the paper's defaults
    model = folder.reference(prune)

    stream = not args.json
    if stream:
        print(f"question: {question}")
        print("answer:   ", end="", flush=True)
    result = generate(model, torch.from_numpy(prompt.input_ids).unsqueeze(0), torch.from_numpy(pixels),
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, eos_token_id=tokenizer.eos_token_id,
                      on_token=stream_printer(tokenizer.decode, stream))  # fmt: skip
    features = model.encode_image(torch.from_numpy(pixels))  # the same Stage 1 again, for its scores
    scores = features.cls_scores[0].float().numpy()  # [n]
    kept = features.kept_index[0].tolist()
    seen = pixels_to_image(pixels, preprocess.image_mean, preprocess.image_std)
    kept_png = draw_kept_patches(seen, scores, kept, out / KEPT_PNG)
    curve_png = draw_cls_curve(scores, len(kept), out / CURVE_PNG)

    text = tokenizer.decode(result.token_ids)
    stats = {
        "model": str(model_dir),
        "image": str(image_path),
        "question": question,
        "text": text,
        "ground_truth": truth,
        **generation_figures(result),
        "kept_index": kept,
        "kept_patches_png": str(kept_png),
        "cls_curve_png": str(curve_png),
        "prune": prune.to_dict(),
    }
    if stream:
        print()
        if truth is not None:
            print(f"truth:    {truth}")
        print_summary(stats)
        print(f"kept patches: {kept_png}")
        print(f"CLS curve:    {curve_png}")
    return stats
