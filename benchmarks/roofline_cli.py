"""`vtprune roofline`: the paper's Table 6 (--table6), or a deployment's footprint and predicted latency.

Deployment mode answers "does it fit, and how fast": memory footprint (benchmarks/memory.py), the
prefill (vision tower + projector + LLM), the mean decode step and the whole answer, with Stage 2's
eviction budget holding the cache at heavy + recent positions. --png draws the roofline: every
operator at its arithmetic intensity and attainable ops/s, plus any measured points the bench adds.
"""

from __future__ import annotations

import os
from pathlib import Path

from vtprune.benchmarks import hardware as hardware_presets
from vtprune.benchmarks import table6
from vtprune.benchmarks.hardware import Hardware
from vtprune.benchmarks.memory import deployed_bits, eviction_budget, footprint
from vtprune.benchmarks.roofline import decode_layers, decode_time, layer_table, prefill_layers, totals
from vtprune.errors import UserError
from vtprune.models.shapes import ModelShape, preset

PARTS = ("vision", "projector", "text", "lm_head")


def main(args) -> dict:
    if args.table6:
        result = {"mode": "paper", "hardware": "a100-40g", "tokens": _table6_tokens(), "cells": table6.cells()}
        if not args.json:
            _print_table6(result["cells"])
        return result
    shape = _shape(args)
    hw = hardware_presets.get(args.hardware)
    result = deployment(shape, hw, args.precision, args.visual_tokens, args.text_tokens, args.new_tokens,
                        heavy_ratio=args.heavy_ratio, recent_ratio=args.recent_ratio, png=args.png)
    if not args.json:
        _print_deployment(result)
    return result


def deployment(shape: ModelShape, hw: Hardware, precision: str, visual_tokens: int, text_tokens: int,
               new_tokens: int, heavy_ratio: float = 0.5, recent_ratio: float = 0.5, prune_layer: int = 3,
               png: str | Path | None = None, measured: list[tuple[str, float, float]] | None = None,
               title: str | None = None, roofs: dict[str, tuple[float, float]] | None = None) -> dict:
    """Footprint, prefill ms, decode ms/token and total ms of one image + prompt on `hw`, weight-only
    quantized to `precision`. `measured` = [(label, intensity ops/byte, ops/s)] adds measured runs to the PNG."""
    if new_tokens < 0:
        raise UserError("--new-tokens", f"expected an integer >= 0, got {new_tokens}")
    bits = deployed_bits(precision, act_bits=hw.act_bits)
    prompt = visual_tokens + text_tokens
    mem = footprint(shape, bits, hw.kind, visual_tokens, text_tokens, prompt + new_tokens, heavy_ratio, recent_ratio)
    budget = eviction_budget(prompt, heavy_ratio, recent_ratio)

    prefill = prefill_layers(shape, visual_tokens, text_tokens, bits, "deployment", prune_layer)
    by_part = {part: totals([x for x in prefill if x.part == part], hw, bits).time * 1e3 for part in PARTS}
    prefill_ms = sum(by_part.values())
    decode_ms = decode_time(shape, hw, bits, prompt, new_tokens, kv_budget=budget) * 1e3
    decode_full_ms = decode_time(shape, hw, bits, prompt, new_tokens, kv_budget=None) * 1e3
    step = decode_layers(shape, min(prompt, budget), bits, "deployment")
    prefill_total, step_total = totals(prefill, hw, bits), totals(step, hw, bits)

    result = {
        "mode": "deployment", "model": shape.name, "hardware": hw.name, "precision": precision,
        "bits": {"weight": bits.weight, "activation": bits.act, "kv": bits.kv},
        "visual_tokens": visual_tokens, "text_tokens": text_tokens, "new_tokens": new_tokens,
        "kv_budget_tokens": budget,
        "memory_gb": round(hw.memory_bytes / 2**30, 3),
        "footprint": mem.to_dict(),
        "fits": mem.total <= hw.memory_bytes,
        "prefill_ms": round(prefill_ms, 4),
        "prefill_ms_by_part": {k: round(v, 4) for k, v in by_part.items()},
        "decode_ms_per_token": round(decode_ms / new_tokens, 4) if new_tokens else None,
        "decode_ms_per_token_without_eviction": round(decode_full_ms / new_tokens, 4) if new_tokens else None,
        "total_ms": round(prefill_ms + decode_ms, 4),
        "total_ms_without_eviction": round(prefill_ms + decode_full_ms, 4),
        # whole-pass ops and bytes: with a measured time, `measured_point` places a run on the chart
        "prefill_ops": prefill_total.ops, "prefill_bytes": prefill_total.memory_access,
        "decode_step_ops": step_total.ops, "decode_step_bytes": step_total.memory_access,
        "prefill_layers": layer_table(prefill, hw, bits),
        "decode_step_layers": layer_table(step, hw, bits),
    }
    if png is not None:
        result["png"] = str(write_png(png, result["prefill_layers"], result["decode_step_layers"], hw, bits.weight,
                                      bits.act, bits.kv, measured=measured,
                                      title=title or f"{shape.name}, {precision}, {hw.name}", roofs=roofs))
    return result


def measured_point(label: str, ops: float, bytes_moved: float, seconds: float) -> tuple[str, float, float]:
    """A measured run as a chart point: the model's ops and bytes for the pass, the measured seconds."""
    return label, ops / bytes_moved, ops / seconds


def write_png(path: str | Path, prefill_rows: list[dict], decode_rows: list[dict], hw: Hardware,
              weight_bits: float = 16, act_bits: float = 16, kv_bits: float = 16,
              measured: list[tuple[str, float, float]] | None = None, title: str = "",
              roofs: dict[str, tuple[float, float]] | None = None) -> Path:
    """Log-log roofline: the roof min(peak, intensity * rate), each operator's operating point
    (prefill: circles, one decode step: triangles), and measured points (stars). `roofs` {name: (peak ops/s,
    bytes/s)} adds a dashed roof per weight format (a CPU's kernels each have their own peak and streaming
    rate), so each measured point can be read against its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peak = hw.peak_ops(weight_bits, act_bits, kv_bits)
    prefill_rows = [r for r in prefill_rows if r["ops"] > 0 and r["bytes"] > 0]  # e.g. a projector on 0 tokens
    decode_rows = [r for r in decode_rows if r["ops"] > 0 and r["bytes"] > 0]
    points = [r["intensity"] for r in prefill_rows + decode_rows] + [m[1] for m in measured or []]
    lo, hi = min(min(points), 0.1 * hw.ridge) / 2, max(max(points), 10 * hw.ridge) * 2
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(x, np.minimum(peak, x * hw.memory_rate(weight_bits)), color="black", lw=2, label=f"{hw.name} roof")
    for (name, (other, rate)), style in zip(sorted((roofs or {}).items(), key=lambda r: r[1]), ("--", ":", "-.", (0, (5, 1)))):
        ax.loglog(x, np.minimum(other, x * rate), color="0.35", lw=1, ls=style, label=f"{name} roof")
    colors = {"vision": "tab:green", "projector": "tab:purple", "text": "tab:blue", "lm_head": "tab:orange"}
    for rows, marker, stage in ((prefill_rows, "o", "prefill"), (decode_rows, "^", "decode step")):
        for part, color in colors.items():
            sel = [r for r in rows if r["part"] == part]
            if sel:
                ax.scatter([r["intensity"] for r in sel], [r["attainable_ops_per_s"] for r in sel], marker=marker,
                           color=color, alpha=0.75, s=28, label=f"{part} ({stage})")
    for i, (label, intensity, ops_per_s) in enumerate(measured or []):
        ax.scatter([intensity], [ops_per_s], marker="*", s=160, color="red", zorder=5,
                   label="measured (whole pass)" if i == 0 else None)
    ax.set_xlabel("arithmetic intensity (ops / byte)")
    ax.set_ylabel("attainable ops / s")
    ax.set_title(title or f"roofline, {hw.name}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _label_stars(fig, ax, measured or [])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(str(path), f"cannot write the chart: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def _label_stars(fig, ax, measured: list[tuple[str, float, float]]) -> None:
    """Each star's label beside it, moved up or down a line at a time until its text overlaps no label placed
    before it (stars often share a spot: two systems at one operating point)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    steps = (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6)  # lines away from the star
    for label, x, y in sorted(measured, key=lambda m: -m[2]):
        for n, step in enumerate(steps + (0,)):  # the last try: no free spot within six lines, so overlap
            text = ax.annotate(label, (x, y), textcoords="offset points", fontsize=7, xytext=(9, -3 + 9 * step),
                               arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
            text.update_positions(renderer)  # the offset is applied at draw time
            box = Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            if n == len(steps) or not any(box.overlaps(b) for b in placed):
                break
            text.remove()
        placed.append(box)


def _shape(args) -> ModelShape:
    if getattr(args, "model", None):
        from vtprune.models.loading import read_config

        return ModelShape.from_config(read_config(args.model), name=str(Path(args.model) / "config.json"))
    return preset(args.preset)


def _table6_tokens() -> dict:
    return {
        method: {"visual": v, "text": t, "llm_tokens": v + t,
                 "consistent_fp16_lengths": _span(table6.consistent_prompt_lengths(method, range(v + t - 40, v + t + 40)))}
        for method, (v, t) in table6.TOKENS.items()
    }


def _span(lengths: list[int]) -> list[int] | None:
    return [lengths[0], lengths[-1]] if lengths else None


def _print_table6(cells: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = {"flops_t": "FLOPs (T)", "prefill_ms": "Prefill (ms)", "total_memory_gb": "Total Memory (G)",
             "stored_activation_gb": "Storing Act. (G)"}
    table = Table(title="Table 6 (A100-40G, LLM-Viewer semantics): paper / predicted; * = not reproducible")
    table.add_column("Method")
    table.add_column("Quant.")
    for m in table6.METRICS:
        table.add_column(names[m], justify="right")
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for c in cells:
        rows.setdefault((c["method"], c["precision"]), {})[c["metric"]] = c
    for (method, precision), by_metric in rows.items():
        table.add_row(method, precision.upper(), *[
            f"{c['paper']:g} / {c['predicted']:.3g}{'' if c['reproducible'] else ' *'}"
            for c in (by_metric[m] for m in table6.METRICS)])
    console = Console()
    console.print(table)
    for c in cells:
        if not c["reproducible"]:
            console.print(f"* {c['method']} {c['precision'].upper()} {c['metric']}: {c['note']}")


def _print_deployment(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f = r["footprint"]
    table = Table(title=f"{r['model']} on {r['hardware']}, {r['precision']} ({r['visual_tokens']} visual + "
                        f"{r['text_tokens']} text tokens, {r['new_tokens']} new)")
    table.add_column("")
    table.add_column("predicted", justify="right")
    fits = "fits" if r["fits"] else "does NOT fit"
    table.add_row("memory (GiB)", f"{f['total_gb']:.2f} of {r['memory_gb']:.1f}: {fits}")
    table.add_row("  weights / KV (evicted) / act. / overhead", f"{f['weights_gb']:.2f} / {f['kv_cache_evicted_gb']:.3f}"
                  f" / {f['activations_gb']:.3f} / {f['overhead_gb']:.2f}")
    table.add_row("prefill (ms)", f"{r['prefill_ms']:.2f}")
    for part, ms in r["prefill_ms_by_part"].items():
        table.add_row(f"  {part}", f"{ms:.2f}")
    if r["decode_ms_per_token"] is not None:
        table.add_row("decode (ms / token)", f"{r['decode_ms_per_token']:.3f}")
    table.add_row("total (ms)", f"{r['total_ms']:.1f}")
    Console().print(table)
    if "png" in r:
        Console().print(f"roofline chart: {r['png']}")
