"""What the decoder's arrangement buys: the same checkpoint exported three ways, each decoder variant timed in
one process, the three alternating so they share the machine's load:

    python -m vtprune.benchmarks.decoder_variants --out benchmarks/results/<machine>-decoder-variants.json

- `portable` (standard ops, the layer decomposed): q/k/v and gate/up each one MatMul (export/fuse.py);
- `fused` (the export's default): ONNX opset 24's Attention, RotaryEmbedding, RMSNormalization and Swish
  (export/ort_ops.py), projections fused;
- `unfused`: exported with `fuse_projections` replaced by the identity (what the exporter wrote before it);
- `ort`: `--decoder-form ort`, ONNX Runtime's GroupQueryAttention, RotaryEmbedding and
  SkipSimplifiedLayerNormalization in place of the decomposed layer (export/ort_ops.py), projections fused;
- `inplace`: `--decoder-form inplace`, the cache as fixed buffers each step writes in place through IO
  binding (export/inplace.py, runtime/slots.py), projections fused.
Ratios are each variant's time over `portable`'s (above 1: slower than the decomposed graph). Models: the embedded one
(per-step overhead dominates) and LLaVA-1.5-7B's widths with 2 decoder layers (weight reads dominate); with
`--models llava-cpu-1b --precisions int4`, the bench preset's 22 layers (both at once, at a real depth). Prefill
at 61 and 587 tokens; decode as the median step over 32 steps at a cache of ~600 positions, first growing (no
eviction: `decode_step_ms`), then held at a budget of ~586 with one eviction per step (`decode_step_ms_evicting`,
Stage 2's steady state). At 7B widths also a long cache: a 2,000-token prompt, then decode steps held at a
2,000-position budget (`long_cache`: the default against inplace, int8 and int4, where the cache copies the in-place
form saves are largest). The bundles live in the user cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

PRECISIONS = {"fp32": None, "int8": ["--precision", "int8"], "int4": ["--precision", "int4"]}
PROMPTS = (61, 587)
VARIANTS = ("portable", "unfused", "fused", "ort", "inplace")
STEPS = 32
MODELS = {"embedded": "embedded", "llava-1.5-7b-2l": "llava-1.5-7b widths, 2 layers", "llava-cpu-1b": "llava-cpu-1b (22 layers)"}


def bundles(model_dir: Path, root: Path, precisions=tuple(PRECISIONS)) -> dict[str, Path]:
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in VARIANTS:
        path = root / name
        if not (path / "manifest.json").is_file():
            unfused = mock.patch("vtprune.export.decoder.fuse_projections", lambda graph, weights: weights)
            with unfused if name == "unfused" else contextlib.nullcontext():
                export_bundle(model_dir, path, PruneConfig(), decoder_form=name if name in ("fused", "ort", "inplace") else "portable")
        have = json.loads((path / "manifest.json").read_text())["graphs"]["decoder"]
        for precision, args in PRECISIONS.items():
            if args and precision in precisions and precision not in have:
                subprocess.run([sys.executable, "-m", "vtprune.cli", "quantize", "--bundle", str(path), *args,
                                "--graphs", "decoder"], check=True, stdout=subprocess.DEVNULL)
        out[name] = path
    return out


def time_variant(pipe, rng) -> dict:
    """Prefill ms per prompt length and the median decode step (ms) after the longest prompt."""
    D = pipe.model["hidden_size"]
    result = {}
    for S in PROMPTS:
        embeds = (0.02 * rng.standard_normal((1, S, D))).astype(np.float32)  # [1, S, D], the embeddings' scale
        budget = (S + 1, 0)  # no Stage-2 drop: the same work for every variant
        t = time.perf_counter()
        cache = pipe.empty_cache(capacity=S + STEPS + 1)  # an in-place cache's slots (the others grow)
        logits, _, cache = pipe.prefill(embeds, 0, cache, budget)
        result[f"prefill_ms_{S}"] = (time.perf_counter() - t) * 1000
    for key, budget in (("decode_step_ms", (S + 2 * STEPS + 1, 0)), ("decode_step_ms_evicting", (S // 2, S // 2))):
        steps = []
        for i in range(STEPS):
            token = (0.02 * rng.standard_normal((1, 1, D))).astype(np.float32)  # [1, 1, D]
            position = S + i + (STEPS if key.endswith("evicting") else 0)
            t = time.perf_counter()
            logits, _, cache = pipe.step(token, np.array([[position]]), cache, budget)
            steps.append((time.perf_counter() - t) * 1000)
        result[key] = statistics.median(steps)
    result["cache_positions"] = S + STEPS
    return result


def long_cache(paths: dict[str, Path], threads: int, repeats: int, S: int = 2000) -> dict:
    """Median decode step (ms) at a cache of S positions, evicting one per step, portable against inplace. Run before
    the other timings: a 2,000-token prefill grows each session's arena by gigabytes, which only the sessions'
    end returns (one precision's sessions live in `_long_cache_one` only)."""
    out = {}
    for precision in ("int8", "int4"):
        out[precision] = _long_cache_one(paths, precision, threads, repeats, S)
        print(f"long cache {S} {precision}: inplace/portable {out[precision]['inplace_over_portable']:.2f}x", file=sys.stderr)
    return out


def _long_cache_one(paths: dict[str, Path], precision: str, threads: int, repeats: int, S: int) -> dict:
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    pipes = {n: Pipeline(Bundle.open(paths[n]), precision, "cpu", threads=threads) for n in ("portable", "inplace")}
    D = pipes["portable"].model["hidden_size"]
    rounds: dict[str, list[float]] = {n: [] for n in pipes}
    for r in range(repeats + 1):  # round 0 warms up
        rng = np.random.default_rng(r)
        for name, pipe in pipes.items():
            budget = (S // 2, S - S // 2)
            cache = pipe.empty_cache(capacity=pipe.cache_capacity(budget, S + STEPS))
            embeds = (0.02 * rng.standard_normal((1, S, D))).astype(np.float32)  # [1, S, D]
            _, _, cache = pipe.prefill(embeds, 0, cache, budget)
            steps = []
            for i in range(STEPS // 2):
                token = (0.02 * rng.standard_normal((1, 1, D))).astype(np.float32)
                t = time.perf_counter()
                _, _, cache = pipe.step(token, np.array([[S + i]]), cache, budget)
                steps.append((time.perf_counter() - t) * 1000)
            if r:
                rounds[name].append(statistics.median(steps))
    med = {n: statistics.median(v) for n, v in rounds.items()}
    return {"cache_positions": S, "portable_step_ms": med["portable"], "inplace_step_ms": med["inplace"],
            "inplace_over_portable": med["inplace"] / med["portable"]}


def main(argv=None) -> int:
    import onnx

    from vtprune.benchmarks.bench import machine_info
    from vtprune.benchmarks.presets import build_llava_7b, cache_root, resolve
    from vtprune.models.loading import default_model_dir
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per variant (medians)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default 0: all cores)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS)[:2],
                    help="checkpoints (default: embedded llava-1.5-7b-2l; llava-cpu-1b is the bench preset, 22 layers)")
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                    help="variants timed (llava-cpu-1b: int4 alone fits four forms' sessions in memory at once)")
    args = ap.parse_args(argv)

    record = {"runner": "python -m vtprune.benchmarks.decoder_variants " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(args.threads, os.getloadavg()), "models": {}}
    for key in args.models:
        label = MODELS[key]
        if key == "llava-1.5-7b-2l":
            model_dir = cache_root() / "llava-1.5-7b-2l" / "model"
            if not (model_dir / "config.json").is_file():
                build_llava_7b(model_dir, 2)
        else:
            model_dir = default_model_dir() if key == "embedded" else resolve(key).model_dir
        root = cache_root() / "decoder-variants" / key
        paths = bundles(model_dir, root, args.precisions)
        entry = {"decoder_nodes": {}, "runs": {}}
        for name, path in paths.items():
            graph = onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph
            entry["decoder_nodes"][name] = {"nodes": len(graph.node), "matmuls": sum(n.op_type == "MatMul" for n in graph.node),
                                            "contrib_ops": sum(n.domain == "com.microsoft" for n in graph.node)}
        if key == "llava-1.5-7b-2l":
            entry["long_cache"] = long_cache(paths, args.threads, args.repeats)
        for precision in args.precisions:
            pipes = {name: Pipeline(Bundle.open(path), precision, "cpu", threads=args.threads) for name, path in paths.items()}
            rounds: dict[str, list[dict]] = {name: [] for name in pipes}
            for r in range(args.repeats + 1):  # round 0 warms the sessions up and is dropped
                for name, pipe in pipes.items():
                    timing = time_variant(pipe, np.random.default_rng(r))
                    if r:
                        rounds[name].append(timing)
            medians = {name: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for name, ts in rounds.items()}
            timed = [k for k in medians["portable"] if k.endswith("_ms") or "_ms_" in k]
            ratios = {f"{name}_over_portable": {k: medians[name][k] / medians["portable"][k] for k in timed}
                      for name in pipes if name != "portable"}
            entry["runs"][precision] = {**medians, **ratios}
            for name, r in ratios.items():
                print(f"{label} {precision} {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()), file=sys.stderr)
            del pipes, pipe  # the loop's last pipeline too: a session's arena holds gigabytes at 7B widths
        record["models"][label] = entry
    record["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    chart(record, out.with_suffix(".png"))
    return 0


def chart(record: dict, path: Path) -> None:
    """Each variant's time over the portable graph's per model, precision and measurement (below 1: faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(record["models"])
    runs0 = record["models"][models[0]]["runs"]
    ratios = [k for k in next(iter(runs0.values())) if k.endswith("_over_portable")]
    fig, axes = plt.subplots(len(ratios), len(models), figsize=(5.5 * len(models), 3.4 * len(ratios)), sharey=True, squeeze=False)
    for row, ratio in enumerate(ratios):
        for ax, label in zip(axes[row], models):
            runs = record["models"][label]["runs"]
            keys = list(next(iter(runs.values()))[ratio])
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                xs = np.arange(len(runs)) + (j - (len(keys) - 1) / 2) * width
                ax.bar(xs, [runs[p][ratio][key] for p in runs], width, label=key.replace("_ms", "").replace("_", " "))
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(runs)), list(runs))
            title = f"{label}: {ratio.split('_over_')[0]}"
            long = record["models"][label].get("long_cache") if ratio.startswith("inplace") else None
            if long:  # the decode step at a 2,000-position cache, measured apart
                title += "\ndecode at a {} cache: {}".format(
                    next(iter(long.values()))["cache_positions"], ", ".join(f"{p} {r['inplace_over_portable']:.2f}x" for p, r in long.items()))
            ax.set_title(title, fontsize=10)
        axes[row][0].set_ylabel(f"{ratio.split('_over_')[0]} time / portable time")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)  # below the panels: no bar hidden
    fig.suptitle(f"Decoder variants against the portable graph, {record['machine']['cpu']},\n"
                 f"{record['machine'].get('threads_used', '')} threads (below 1: faster than the portable graph)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
