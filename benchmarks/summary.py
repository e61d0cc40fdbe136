"""From raw runs to the figures `vtprune bench` reports, and the roofline's prediction of each figure.

Measured: medians over runs of vision ms, prefill ms, time to first token, and decode tokens/s at each
requested length N (the N - 1 decode steps after the first token). Predicted: the same figures from the
deployment roofline (benchmarks/roofline.py) at the system's own precisions and token counts, so every
measured figure sits beside its prediction as measured / predicted (for tokens/s: predicted / measured,
so that > 1 always means slower than the roof).
"""

from __future__ import annotations

import statistics

from vtprune.benchmarks.hardware import Hardware
from vtprune.benchmarks.memory import deployed_bits, eviction_budget, footprint
from vtprune.benchmarks.roofline import decode_time, prefill_layers, totals
from vtprune.models.shapes import ModelShape


def decode_tokens_per_s(token_ms: list[float], n: int) -> float | None:
    """Tokens/s over the N - 1 steps that follow the first token, or None if the run made fewer than N."""
    if n < 2 or len(token_ms) < n or token_ms[n - 1] <= 0:
        return None
    return (n - 1) / (token_ms[n - 1] / 1e3)


def summarize(runs: list[dict], lengths: list[int]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    decode = {}
    for n in lengths:
        values = [v for v in (decode_tokens_per_s(r["token_ms"], n) for r in runs) if v is not None]
        decode[str(n)] = statistics.median(values) if values else None
    return {
        "vision_ms": med("vision_ms"),
        "prefill_ms": med("prefill_ms"),
        "ttft_ms": med("ttft_ms"),
        "decode_tokens_per_s": decode,
        "visual_tokens": int(med("visual_tokens")),
        "total_tokens": int(med("prompt_tokens")),
        "runs": len(runs),
    }


def predict(shape: ModelShape, hw: Hardware, vision_precision: str, text_precision: str, visual_tokens: int,
            text_tokens: int, lengths: list[int], evict: bool, prune_layer: int = 3,
            heavy_ratio: float = 0.5, recent_ratio: float = 0.5) -> dict:
    """The roofline's figures for one system: vision (tower + projector) at the vision graph's precision,
    prefill (LLM + lm_head) and decode at the decoder's; the KV cache capped at Stage 2's budget if `evict`."""
    vbits = deployed_bits(vision_precision, act_bits=hw.act_bits)
    tbits = deployed_bits(text_precision, act_bits=hw.act_bits)
    part_ms = lambda layers, bits, parts: totals([x for x in layers if x.part in parts], hw, bits).time * 1e3  # noqa: E731
    vision_ms = part_ms(prefill_layers(shape, visual_tokens, text_tokens, vbits, "deployment", prune_layer), vbits,
                        ("vision", "projector"))
    prefill_ms = part_ms(prefill_layers(shape, visual_tokens, text_tokens, tbits, "deployment", prune_layer), tbits,
                         ("text", "lm_head"))
    prompt = visual_tokens + text_tokens
    budget = eviction_budget(prompt, heavy_ratio, recent_ratio) if evict else None
    decode = {}
    for n in lengths:
        decode[str(n)] = (n - 1) / decode_time(shape, hw, tbits, prompt, n - 1, kv_budget=budget) if n >= 2 else None
    mem = footprint(shape, tbits, hw.kind, visual_tokens, text_tokens, prompt + max(lengths), heavy_ratio, recent_ratio)
    return {
        "vision_ms": vision_ms,
        "prefill_ms": prefill_ms,
        "ttft_ms": vision_ms + prefill_ms,
        "decode_tokens_per_s": decode,
        "memory_mb": (mem.total if evict else mem.total_without_eviction) / 2**20,
    }


def over_roofline(measured: dict, predicted: dict) -> dict:
    """measured / predicted for times, predicted / measured for rates: > 1 is slower than the roof."""
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    out = {k: ratio(measured[k], predicted[k]) for k in ("vision_ms", "prefill_ms", "ttft_ms")}
    out["decode_tokens_per_s"] = {n: ratio(predicted["decode_tokens_per_s"].get(n), v)
                                  for n, v in measured["decode_tokens_per_s"].items()}
    if measured.get("peak_rss_mb") is not None:
        out["peak_rss_mb"] = ratio(measured["peak_rss_mb"], predicted["memory_mb"])
    return out


def operating_points(shape: ModelShape, hw: Hardware, text_precision: str, visual_tokens: int, text_tokens: int,
                     measured: dict, evict: bool, prune_layer: int = 3) -> dict:
    """Ops and bytes of the LLM prefill and of one decode step, with the measured seconds, for the chart."""
    from vtprune.benchmarks.roofline import decode_layers

    bits = deployed_bits(text_precision, act_bits=hw.act_bits)
    llm = [x for x in prefill_layers(shape, visual_tokens, text_tokens, bits, "deployment", prune_layer)
           if x.part in ("text", "lm_head")]
    prompt = visual_tokens + text_tokens
    context = min(prompt, eviction_budget(prompt, 0.5, 0.5)) if evict else prompt
    step = totals(decode_layers(shape, context, bits, "deployment"), hw, bits)
    pre = totals(llm, hw, bits)
    rates = [v for v in measured["decode_tokens_per_s"].values() if v]
    return {"prefill": (pre.ops, pre.memory_access, measured["prefill_ms"] / 1e3),
            "decode": (step.ops, step.memory_access, 1 / rates[-1]) if rates else None}
