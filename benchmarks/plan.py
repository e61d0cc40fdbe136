"""`vtprune plan`: does a LLaVA fit on a GPU at a precision and context, with and without Stage 2's eviction?

The figures come from the one memory model, `benchmarks/memory.py`. Torch-free: a checkpoint is read
only for its config.json.
"""

from __future__ import annotations

from pathlib import Path

from vtprune.benchmarks import hardware as hardware_presets
from vtprune.benchmarks.memory import GIB, deployed_bits, footprint
from vtprune.errors import UserError
from vtprune.models.shapes import ModelShape, preset


def main(args) -> dict:
    shape = _shape(args.model, args.preset)
    hw = hardware_presets.get(args.gpu, option="--gpu")
    if args.memory_gb is not None and not args.memory_gb > 0:
        raise UserError("--memory-gb", f"expected a positive number of GiB, got {args.memory_gb}")
    capacity = args.memory_gb * GIB if args.memory_gb is not None else hw.memory_bytes
    result = plan(shape, hw.kind, capacity, args.precision, args.context, args.visual_tokens, args.text_tokens,
                  args.heavy_ratio, args.recent_ratio, act_bits=hw.act_bits)
    result["gpu"] = hw.name
    if not args.json:
        _print(result)
    return result


def plan(shape: ModelShape, kind: str, capacity_bytes: float, precision: str, context: int, visual_tokens: int,
         text_tokens: int, heavy_ratio: float, recent_ratio: float, act_bits: int = 16) -> dict:
    """The plan as a flat dict: every component in GiB, `fits` (with eviction, what vtprune runs) and
    `fits_without_eviction`."""
    bits = deployed_bits(precision, act_bits=act_bits)
    mem = footprint(shape, bits, kind, visual_tokens, text_tokens, context, heavy_ratio, recent_ratio)
    return {
        "model": shape.name, "precision": precision, "weight_bits": bits.weight,
        "context": context, "visual_tokens": visual_tokens, "text_tokens": text_tokens,
        "heavy_ratio": heavy_ratio, "recent_ratio": recent_ratio,
        **mem.to_dict(),
        "memory_gb": round(capacity_bytes / GIB, 3),
        "fits": mem.total <= capacity_bytes,
        "fits_without_eviction": mem.total_without_eviction <= capacity_bytes,
    }


def _shape(model: str | None, preset_name: str | None) -> ModelShape:
    if model is not None and preset_name is not None:
        raise UserError("--model", "give either --model (a llava-hf folder) or --preset, not both")
    if model is not None:
        from vtprune.models.loading import read_config

        return ModelShape.from_config(read_config(model), name=str(Path(model) / "config.json"))
    return preset(preset_name or "llava-1.5-7b")


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{r['model']}, {r['precision']}, context {r['context']} on {r['gpu']} ({r['memory_gb']:g} GiB)")
    table.add_column("GiB", justify="left")
    table.add_column("with eviction", justify="right")
    table.add_column("without", justify="right")
    table.add_row("weights", f"{r['weights_gb']:.2f}", f"{r['weights_gb']:.2f}")
    table.add_row("KV cache", f"{r['kv_cache_evicted_gb']:.3f} ({r['kv_budget_tokens']} tok)",
                  f"{r['kv_cache_gb']:.3f} ({r['context_tokens']} tok)")
    table.add_row("activations (peak)", f"{r['activations_gb']:.3f}", f"{r['activations_gb']:.3f}")
    table.add_row("runtime overhead", f"{r['overhead_gb']:.2f}", "")
    table.add_row("total", f"{r['total_gb']:.2f}", f"{r['total_without_eviction_gb']:.2f}")
    table.add_row("fits", "yes" if r["fits"] else "NO", "yes" if r["fits_without_eviction"] else "NO")
    Console().print(table)
