"""Long generation: thousands of decode steps with Stage 2's eviction, on ONNX Runtime and on the PyTorch reference.

Why: H2O's promise is a KV cache capped at heavy + recent however long the answer, so resident memory
must stay flat once warm. This records, for each backend, the cache length of layer 0 and the process's
resident memory (RSS) after every decode step, and writes `long_generation.json` + `.png` (both against
the step). It asserts nothing: a test asserts the cache bound; this reports whether RSS stayed within 5%
of its value at the end of the warm-up.

    python -m vtprune.benchmarks.long_generation                      # the embedded model, 2,000 steps
    python -m vtprune.benchmarks.long_generation --untrained          # random weights, the embedded geometry
    python -m vtprune.benchmarks.long_generation --model DIR --bundle DIR --steps 2000

Each backend runs in a fresh process, so the ONNX figures are those of the torch-free runtime alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vtprune.models.config import PruneConfig
from vtprune.runtime.memory import current_rss_mb

QUESTION = "Describe the image ."
FLAT_PCT = 5.0  # RSS may grow this much after the warm-up and still count as flat


def test_image(size: int = 336, seed: int = 0) -> "Image.Image":
    """A few bright squares on a dim noisy background (objects on a minority of the patches)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)  # [H, W, 3]
    for _ in range(3):
        x, y = rng.integers(0, size - size // 6, 2)
        pixels[y : y + size // 6, x : x + size // 6] = rng.integers(150, 256, 3)
    return Image.fromarray(pixels)


def summarize(cache_lengths: list[int], rss_mb: list[float], budget: int, warmup: int, seconds: float) -> dict:
    """The figures of one backend: the cache bound and how far RSS moved after the warm-up."""
    base = rss_mb[warmup - 1]
    after = rss_mb[warmup:]
    growth = (max(after) - base) / base * 100
    slope = float(np.polyfit(np.arange(len(after)), after, 1)[0]) * 1000 if len(after) > 1 else 0.0
    return {
        "steps": len(cache_lengths),
        "budget": budget,
        "max_cache": max(cache_lengths),
        "cache_within_budget": max(cache_lengths) <= budget,
        "rss_after_warmup_mb": round(base, 2),
        "rss_max_after_warmup_mb": round(max(after), 2),
        "rss_final_mb": round(rss_mb[-1], 2),
        "rss_growth_pct": round(growth, 3),
        "rss_slope_mb_per_1000_steps": round(slope, 3),
        "rss_flat": growth <= FLAT_PCT,
        "ms_per_step": round(seconds * 1000 / len(cache_lengths), 3),
        "cache_lengths": cache_lengths,
        "rss_mb": [round(r, 2) for r in rss_mb],
    }


def run_onnx(bundle_dir: Path, steps: int, warmup: int, prune: PruneConfig) -> dict:
    """`steps` decode steps on the bundle (Pipeline), greedy, never stopping at EOS."""
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline
    from vtprune.models.preprocess import preprocess

    pipe = Pipeline(Bundle.open(bundle_dir), threads=1)
    prompt = pipe.tokenizer.build(QUESTION, pipe.template)
    pixels = preprocess(test_image(pipe.model.get("image_size", 336)), pipe.preprocess)
    rss: list[float] = []
    t0 = time.perf_counter()
    result = pipe.generate(prompt, pixels, prune, max_new_tokens=steps + 1, stop_at_eos=False,
                           on_token=lambda token: rss.append(current_rss_mb()))  # called before each decode step
    seconds = time.perf_counter() - t0
    L = result.visual_tokens_kept + len(prompt.input_ids) - 1
    out = summarize(result.cache_lengths, rss[1:], sum(pipe.budget(L, prune)), warmup, seconds)
    return {"backend": "onnx", "prompt_tokens": L, **out}


def run_torch(model_dir: Path, steps: int, warmup: int, prune: PruneConfig) -> dict:
    """The same on the PyTorch reference (PrunedLlava): prefill, then `steps` greedy decode steps."""
    import torch

    from vtprune.models.loading import ModelFolder
    from vtprune.models.preprocess import preprocess

    torch.set_num_threads(1)
    folder = ModelFolder(model_dir)
    tokenizer, config = folder.tokenizer, folder.preprocess
    model = folder.reference(prune)
    prompt = tokenizer.build(QUESTION)
    pixels = torch.from_numpy(preprocess(test_image(model.config.vision_config.image_size), config))  # [1, 3, H, W]
    lengths: list[int] = []
    rss: list[float] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        image = model.encode_image(pixels)
        embeds = model.splice(torch.from_numpy(prompt.input_ids)[None], image.embeds)  # [1, L, D]
        logits, cache, _ = model.prefill(embeds)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1)  # [1]
            logits = model.decode_step(token.view(1, 1), cache)
            lengths.append(cache.length)
            rss.append(current_rss_mb())
    seconds = time.perf_counter() - t0
    L = embeds.shape[1]
    heavy, recent = prune.budgets(L)
    return {"backend": "torch", "prompt_tokens": L, **summarize(lengths, rss, heavy + recent, warmup, seconds)}


def long_generation(model_dir: Path | None, bundle_dir: Path | None, steps: int = 2000, warmup: int = 200,
                    prune: PruneConfig | None = None, backends: tuple[str, ...] = ("onnx", "torch"),
                    fresh_process: bool = True) -> dict:
    """Both backends' per-step cache length and RSS, with the budget and the flatness verdict.

    With `fresh_process` each backend runs in its own new interpreter (spawn), so neither one's memory,
    nor torch's when only the ONNX runtime is measured, shows in the other's RSS.
    """
    if not 0 < warmup < steps:
        raise ValueError(f"expected 0 < warmup < steps, got warmup={warmup}, steps={steps}")
    prune = prune or PruneConfig()
    jobs = {"onnx": (run_onnx, bundle_dir), "torch": (run_torch, model_dir)}
    runs = []
    for backend in backends:
        fn, path = jobs[backend]
        if fresh_process:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                runs.append(pool.apply(fn, (Path(path), steps, warmup, prune)))
        else:
            runs.append(fn(Path(path), steps, warmup, prune))
    return {
        "model": str(model_dir) if model_dir else None,
        "bundle": str(bundle_dir) if bundle_dir else None,
        "steps": steps,
        "warmup": warmup,
        "flat_threshold_pct": FLAT_PCT,
        "prune": prune.to_dict(),
        "runs": runs,
    }


def write_results(result: dict, out: Path, name: str = "long_generation") -> tuple[Path, Path]:
    """`<name>.json` and `<name>.png` (cache length and RSS against the step), each written then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    tmp = json_path.with_name(f".{json_path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(json_path)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for run in result["runs"]:
        steps = np.arange(1, run["steps"] + 1)
        line, = top.plot(steps, run["cache_lengths"], label=f"{run['backend']} (budget {run['budget']})")
        top.axhline(run["budget"], color=line.get_color(), linestyle=":", linewidth=1)
        bottom.plot(steps, run["rss_mb"], color=line.get_color(),
                    label=f"{run['backend']}: {run['rss_growth_pct']:+.2f}% after warm-up")
    for ax in (top, bottom):
        ax.axvline(result["warmup"], color="grey", linestyle="--", linewidth=1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("KV cache length (layer 0)")
    bottom.set_ylabel("resident memory (MiB)")
    bottom.set_xlabel("decode step")
    fig.suptitle(f"{result['steps']} decode steps with eviction (heavy {result['prune']['heavy_ratio']}, "
                 f"recent {result['prune']['recent_ratio']}); warm-up {result['warmup']} steps", fontsize=10)
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return json_path, png_path


def untrained_model(out: Path) -> Path:
    """Random weights in the embedded model's geometry (336 px, 576 patches), with its tokenizer: the cache
    and memory behaviour do not depend on training."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vtprune.models.embedded import tokenizer as tokenizer_mod
    from vtprune.models.embedded.model import model_config

    tokenizer_mod.save(out)
    tok = tokenizer_mod.build()
    config = model_config(len(tok), tok.convert_tokens_to_ids(tokenizer_mod.IMAGE_TOKEN), tok.pad_token_id,
                          tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="llava-hf checkpoint (default: the embedded model)")
    p.add_argument("--bundle", type=Path, default=None, help="its ONNX bundle (default: exported to a temporary folder)")
    p.add_argument("--untrained", action="store_true", help="random weights in the embedded geometry")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--heavy-ratio", type=float, default=0.5)
    p.add_argument("--recent-ratio", type=float, default=0.5)
    p.add_argument("--backends", default="onnx,torch")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    from vtprune.errors import UserError

    try:
        with tempfile.TemporaryDirectory(prefix="vtprune-long-") as scratch:
            model_dir, bundle_dir = args.model, args.bundle
            if args.untrained:
                model_dir = untrained_model(Path(scratch) / "model")
            if model_dir is None:
                from vtprune.models.loading import default_model_dir

                model_dir = default_model_dir()
            prune = PruneConfig(heavy_ratio=args.heavy_ratio, recent_ratio=args.recent_ratio)
            if bundle_dir is None and "onnx" in args.backends:
                from vtprune.export.bundle import export_bundle

                bundle_dir = Path(scratch) / "bundle"
                export_bundle(model_dir, bundle_dir, prune)
            result = long_generation(model_dir, bundle_dir, args.steps, args.warmup, prune, tuple(args.backends.split(",")))
            result["model"] = "untrained, embedded geometry" if args.untrained else result["model"]
    except UserError as e:
        print(f"long_generation: error: {e.where}: {e.what}", file=sys.stderr)
        return 2
    json_path, png_path = write_results(result, args.out)
    for run in result["runs"]:
        print(f"{run['backend']:>5}: {run['steps']} steps, {run['ms_per_step']:.2f} ms/step, cache max {run['max_cache']} "
              f"(budget {run['budget']}), RSS {run['rss_after_warmup_mb']:.1f} -> max {run['rss_max_after_warmup_mb']:.1f} MiB "
              f"({run['rss_growth_pct']:+.2f}%, {'flat' if run['rss_flat'] else 'NOT flat'} within {FLAT_PCT:g}%)")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
