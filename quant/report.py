"""`vtprune quantize --report`: what each variant of a bundle costs and what it changes, on this CPU.

For every variant in the manifest: size on disk per graph; accuracy on the embedded question set's test
split (`variant_answerer` below, scored by `vtprune.models.embedded.scoring` as `vtprune eval` scores), overall
and per question kind, against fp32; how often the answer is fp32's; visual tokens kept (quantizing the vision graph can move the split point); decode
tokens/s on the CPU (ONNX Runtime, one thread, fixed-length greedy runs; `--provider` and `--threads` set both the
accuracy runs' and these). Written as JSON + a PNG bar chart.
Targets (issue 6): INT8 within 0.5 accuracy points of fp32, INT4 within 2, the INT4 decoder at most 30%
of the fp32 decoder's bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vtprune.runtime.bundle import Bundle

DEFAULT_SAMPLES = 50  # 10 of each question kind
THREADS = 1  # the decode speed of one core: comparable between variants on a shared machine
SPEED_SAMPLES = 3
SPEED_TOKENS = 64
ACCURACY_TARGETS = {"int8": 0.5, "int8-static": 0.5, "int4": 2.0}  # points of accuracy lost at most
SIZE_TARGET = 0.30  # INT4 decoder bytes / fp32 decoder bytes


def variant_names(manifest: dict) -> list[str]:
    """fp32 first, then every precision any graph has."""
    names = {p for variants in manifest["graphs"].values() for p in variants}
    return ["fp32"] + sorted(names - {"fp32"})


def family(precision: str) -> str:
    """`int4-b128` -> `int4`: the target a variant answers to."""
    return precision.split("-b")[0]


def graph_sizes(bundle: Bundle, precision: str) -> dict[str, int | None]:
    """Bytes on disk of each graph's variant (None where the graph has no such variant and falls back to fp32)."""
    sizes = {}
    for graph, variants in bundle.manifest["graphs"].items():
        entry = variants.get(precision)
        sizes[graph] = None if entry is None else sum((bundle.root / f).stat().st_size for f in entry["sha256"])
    return sizes


def variant_answerer(bundle: Bundle, precision: str, prune, provider: str | None = None, threads: int = 0):
    """(answer(image, question, max_new) -> Answer, number of patches) on one variant of a bundle: greedy, on
    ONNX Runtime's `provider` with `threads` (None, 0: the best available, all cores).

    The one answerer on a bundle: this report runs it, and `vtprune eval --bundle` (benchmarks/evaluate.py,
    above this layer) runs it after checking its options.
    """
    from vtprune.models.embedded.scoring import Answer
    from vtprune.models.preprocess import preprocess
    from vtprune.runtime.generate import Pipeline

    pipe = Pipeline(bundle, precision, provider, threads)

    def answer(image, question: str, max_new: int) -> Answer:
        prompt = pipe.tokenizer.build(question, pipe.template)
        result = pipe.generate(prompt, preprocess(image, pipe.preprocess), prune, max_new, 0.0, 1.0, 0)
        return Answer(pipe.tokenizer.decode(result.token_ids), result.visual_tokens_kept, result.prompt_tokens,
                      result.cache_tokens, result.kept_index, None)  # fmt: skip

    return answer, pipe.model["num_patches"]


def accuracy_run(bundle: Bundle, precision: str, limit: int, seed: int, provider: str | None = None,
                 threads: int = 0) -> list:
    """The eval harness's records for one variant: greedy answers to the first `limit` test items, scored."""
    from vtprune.models.config import PruneConfig
    from vtprune.models.embedded.scoring import run

    answer, n = variant_answerer(bundle, precision, PruneConfig(**bundle.manifest["prune"]), provider, threads)
    return run(answer, n, "test", seed, limit, desc=f"report {precision}")


def decode_speed(bundle: Bundle, precision: str, seed: int, provider: str = "cpu", threads: int = THREADS) -> float:
    """Decode tokens/s of one variant: SPEED_SAMPLES test images, SPEED_TOKENS greedy tokens each (by default on
    the CPU, one thread)."""
    from vtprune.models.embedded.data import make_sample
    from vtprune.runtime.generate import Pipeline
    from vtprune.models.preprocess import preprocess

    from tqdm import tqdm

    pipe = Pipeline(bundle, precision, provider, threads)
    steps, seconds = 0, 0.0
    for i in tqdm(range(SPEED_SAMPLES), desc=f"decode speed {precision}", unit="image", disable=None, leave=False):
        s = make_sample("test", seed=seed, index=i)
        g = pipe.generate(pipe.tokenizer.build(s.question, pipe.template), preprocess(s.image, pipe.preprocess),
                          max_new_tokens=SPEED_TOKENS, stop_at_eos=False)
        steps += len(g.token_ids) - 1
        seconds += g.decode_ms / 1000
    return steps / seconds


def summarize(records: list, reference: list) -> dict:
    from vtprune.models.embedded.scoring import summarise

    s = summarise(records)
    return {
        "accuracy": 100 * s["accuracy"],
        "accuracy_by_kind": {k: 100 * v for k, v in s["by_kind"].items()},
        "exist_pope_f1": s["exist_pope"].get("f1"),
        "same_answer_as_fp32": float(np.mean([r.prediction == f.prediction for r, f in zip(records, reference)])),
        "visual_tokens_kept_mean": s["visual_tokens_mean"],
        "same_k_as_fp32": float(np.mean([r.visual_tokens == f.visual_tokens for r, f in zip(records, reference)])),
        "cache_tokens_mean": s["cache_tokens_mean"],
    }


def quantization_report(bundle: Bundle, out: Path, limit: int | None = None, seed: int = 0,
                        provider: str | None = None, threads: int | None = None) -> dict:
    """provider, threads: ONNX Runtime's for every run (`--provider`, `--threads`); None: the best available
    provider and all cores for accuracy, the CPU and THREADS for the decode speed (comparable between variants)."""
    from vtprune.errors import UserError

    n = DEFAULT_SAMPLES if limit is None else limit
    if n < 1:
        raise UserError("--limit", f"expected an integer >= 1, got {n}")
    speed_provider = provider or "cpu"
    speed_threads = THREADS if threads is None else threads
    variants: dict[str, dict] = {}
    reference: list = []
    for precision in variant_names(bundle.manifest):
        entry = {"bytes": graph_sizes(bundle, precision)}
        if precision.startswith("trt-"):
            entry["skipped"] = "TensorRT variants run only on an NVIDIA GPU"
        else:
            records = accuracy_run(bundle, precision, n, seed, provider, threads or 0)
            reference = reference or records
            entry.update(summarize(records, reference),
                         decode_tokens_per_s=decode_speed(bundle, precision, seed, speed_provider, speed_threads))
        variants[precision] = entry
    fp32 = variants["fp32"]
    for precision, v in variants.items():
        if "accuracy" in v:
            v["accuracy_change_points"] = v["accuracy"] - fp32["accuracy"]
    report = {
        "bundle": str(bundle.root),
        "samples": n,
        "split": "test",
        "seed": seed,
        "accuracy_method": "vtprune.benchmarks.evaluate on the bundle (method vtprune, the bundle's pruning config): "
                           "the first N test items, greedy, scored by vtprune.models.embedded.data.score, x100",
        "decode_speed": f"ONNX Runtime {speed_provider}, {speed_threads or 'all'} thread(s), {SPEED_SAMPLES} test images "
                        f"x {SPEED_TOKENS} greedy tokens, tokens after the first / decode time",
        "provider": provider,  # the accuracy runs'; None: the best available
        "threads": threads,  # the accuracy runs'; None: all cores
        "decode_speed_provider": speed_provider,
        "decode_speed_threads": speed_threads,
        "variants": variants,
        "targets": targets(variants),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "quantization.json", json.dumps(report, indent=2).encode())
    plot(report, out / "quantization.png")
    report["files"] = [str(out / "quantization.json"), str(out / "quantization.png")]
    return report


def targets(variants: dict) -> list[dict]:
    checks = []
    for precision, v in variants.items():
        limit = ACCURACY_TARGETS.get(family(precision))
        if limit is not None and "accuracy_change_points" in v:
            check = {"variant": precision, "what": f"accuracy within {limit} points of fp32",
                     "value": round(v["accuracy_change_points"], 2), "met": v["accuracy_change_points"] >= -limit}
            if variants["fp32"]["accuracy"] == 0:  # an untrained model: nothing to lose, the check says nothing
                check.update(met=None, note="fp32 answers no test question right; the change is not informative")
            checks.append(check)
        fp32_dec, dec = variants["fp32"]["bytes"].get("decoder"), v["bytes"].get("decoder")
        if family(precision) == "int4" and dec and fp32_dec:
            checks.append({"variant": precision, "what": f"decoder at most {SIZE_TARGET:.0%} of fp32's bytes",
                           "value": round(dec / fp32_dec, 3), "met": dec / fp32_dec <= SIZE_TARGET})
    return checks


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    v = report["variants"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    bottom = np.zeros(len(names))
    for graph in ("vision", "decoder"):
        mb = np.array([(v[p]["bytes"].get(graph) or 0) / 1e6 for p in names])
        axes[0].bar(x, mb, bottom=bottom, label=f"{graph}.onnx")
        bottom += mb
    axes[0].set_title("size on disk (MB)")
    axes[0].set_ylabel("MB")
    axes[0].legend(fontsize=8)
    ran = [p for p in names if "accuracy" in v[p]]
    kinds = sorted({k for p in ran for k in v[p]["accuracy_by_kind"]})
    width = 0.8 / (len(kinds) + 1)
    xr = np.arange(len(ran))
    axes[1].bar(xr - 0.4 + width / 2, [v[p]["accuracy"] for p in ran], width, label="overall", color="black")
    for i, k in enumerate(kinds):
        axes[1].bar(xr - 0.4 + width * (i + 1.5), [v[p]["accuracy_by_kind"].get(k, 0) for p in ran], width, label=k)
    shown = [v[p]["accuracy"] for p in ran] + [a for p in ran for a in v[p]["accuracy_by_kind"].values()]
    low = max(0.0, 10 * np.floor(min(shown, default=0) / 10) - 10)  # not 0-100: a few points must show
    axes[1].set_ylim(low, 104)  # room for the overall bars' labels
    for xi, p in zip(xr, ran):
        axes[1].annotate(f"{v[p]['accuracy']:.1f}", (xi - 0.4 + width / 2, v[p]["accuracy"]), ha="center", va="bottom", fontsize=7)
    axes[1].set_title(f"accuracy on {report['samples']} test questions (%)")
    axes[1].set_ylabel(f"accuracy (%, axis from {low:.0f})")
    axes[1].legend(fontsize=7, ncol=len(kinds) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    axes[2].bar(xr, [v[p]["visual_tokens_kept_mean"] for p in ran], color="tab:green")
    axes[2].set_title("visual tokens kept (mean)")
    axes[2].set_ylabel("tokens")
    axes[3].bar(xr, [v[p]["decode_tokens_per_s"] for p in ran], color="tab:purple")
    on, threads = report.get("decode_speed_provider", "cpu"), report.get("decode_speed_threads", THREADS)
    axes[3].set_title(f"{on} decode tokens/s ({threads or 'all'} thread{'' if threads == 1 else 's'})")
    axes[3].set_ylabel("tokens/s")
    for ax, labels in zip(axes, [names, ran, ran, ran]):
        ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"quantized variants of {Path(report['bundle']).name}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def print_report(report: dict, file=None) -> None:
    """The report as a table on stdout (size, accuracy and its change, visual tokens, decode speed), then its files."""
    print(f"{'variant':<14}{'MB':>8}{'accuracy':>10}{'vs fp32':>9}{'same answer':>13}{'tokens kept':>13}{'decode tok/s':>14}", file=file)
    for name, v in report["variants"].items():
        mb = sum(b or 0 for b in v["bytes"].values()) / 1e6
        if "accuracy" not in v:
            print(f"{name:<14}{mb:>8.2f}  {v.get('skipped', '')}", file=file)
            continue
        print(f"{name:<14}{mb:>8.2f}{v['accuracy']:>10.1f}{v['accuracy_change_points']:>+9.1f}{v['same_answer_as_fp32']:>13.2f}"
              f"{v['visual_tokens_kept_mean']:>13.1f}{v['decode_tokens_per_s']:>14.1f}", file=file)
    for f in report.get("files", []):
        print(f"wrote {f}", file=file)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
