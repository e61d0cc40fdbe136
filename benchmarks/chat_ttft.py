"""Time to first token per chat turn: turn 1 (vision pass + prefill of the prompt) against later turns on the cache
(prefill of the new turn's tokens only), and against what a stateless server does for the same later turn
(the vision pass and a prefill of the whole conversation again). Embedded model, 3-turn conversations about one
image from the test split; medians; JSON + PNG with the command and the machine's load. It also scores each turn's
answer against the data set's, in the chat and asked alone (the embedded model was trained on independent turns).

    python -m vtprune.benchmarks.chat_ttft --out benchmarks/results [--bundle B] [--conversations 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TURNS = 3


def conversations(n: int):
    """(image, [(question, answer, kind), ...]) about one scene each, from the embedded test split (seed 0)."""
    from vtprune.models.embedded import data

    out = []
    for i in range(n):
        scene = data.make_scene("test", 0, i)
        qas = data.conversation(scene, np.random.default_rng(i), TURNS)
        out.append((scene.image, [(qa.question, qa.answer, qa.kind) for qa in qas]))
    return out


def measure(pipe, items, max_new_tokens: int) -> list[dict]:
    from vtprune.models.preprocess import preprocess
    from vtprune.models.prompt import Prompt
    from vtprune.runtime.chat import Conversation, IndependentTurns

    rows = []
    for c, (image, questions) in enumerate(items):
        pixels = preprocess(image, pipe.preprocess)
        conv = Conversation(pipe, pixels)
        independent = IndependentTurns(pipe, pixels)
        for t, (q, truth, kind) in enumerate(questions):
            stateless = None
            if t > 0:  # the same turn from scratch: vision + the whole conversation's prefill (what no cache costs)
                ids = conv.ids + conv.next_turn_ids(q)
                prompt = Prompt(text="", input_ids=np.array(ids, np.int64), image_index=ids.index(pipe.tokenizer.image_token_id))
                full = pipe.generate(prompt, pixels, max_new_tokens=1)
                stateless = full.vision_ms + full.prefill_ms
            turn = conv.ask(q, max_new_tokens=max_new_tokens)
            alone = independent.ask(q, max_new_tokens=max_new_tokens)
            single = pipe.tokenizer.decode(pipe.generate(pipe.tokenizer.build(q, pipe.template), pixels,
                                                         max_new_tokens=max_new_tokens).token_ids)
            scored = kind != "describe"  # one-word answers are scored by exact match; descriptions are not
            rows.append({"conversation": c, "turn": t + 1, "question": q, "kind": kind, "truth": truth, "answer": turn.text,
                         "single_turn_answer": single, "correct": _same(turn.text, truth) if scored else None,
                         "single_turn_correct": _same(single, truth) if scored else None,
                         "independent_correct": _same(alone.text, truth) if scored else None,
                         "independent_ttft_ms": round(alone.ttft_ms, 3), "fed_tokens": turn.fed_tokens,
                         "cache_tokens": turn.cache_tokens, "visual_tokens_kept": turn.visual_tokens_kept,
                         "vision_ms": round(turn.vision_ms, 3), "prefill_ms": round(turn.prefill_ms, 3),
                         "ttft_ms": round(turn.ttft_ms, 3), "ms_per_token": round(turn.ms_per_token, 3),
                         "stateless_ttft_ms": round(stateless, 3) if stateless is not None else None})
    return rows


def _same(a: str, b: str) -> bool:
    norm = lambda s: " ".join(s.lower().replace(".", " .").split())  # noqa: E731
    return norm(a) == norm(b)


def summarize(rows: list[dict]) -> dict:
    out = {}
    for t in range(1, TURNS + 1):
        r = [x for x in rows if x["turn"] == t]
        scored = [x for x in r if x["correct"] is not None]
        out[f"turn{t}"] = {
            "scored_answers": len(scored),
            "accuracy_in_chat": round(sum(x["correct"] for x in scored) / max(len(scored), 1), 3),
            "accuracy_asked_alone": round(sum(x["single_turn_correct"] for x in scored) / max(len(scored), 1), 3),
            "accuracy_turns_independent": round(sum(x["independent_correct"] for x in scored) / max(len(scored), 1), 3),
            "independent_ttft_ms_median": round(statistics.median(x["independent_ttft_ms"] for x in r), 2),
            "ttft_ms_median": round(statistics.median(x["ttft_ms"] for x in r), 2),
            "fed_tokens_median": statistics.median(x["fed_tokens"] for x in r),
            "cache_tokens_median": statistics.median(x["cache_tokens"] for x in r),
        }
        if t > 1:
            out[f"turn{t}"]["stateless_ttft_ms_median"] = round(statistics.median(x["stateless_ttft_ms"] for x in r), 2)
    ratios = [b["ttft_ms"] / a["ttft_ms"] for a, b in zip([x for x in rows if x["turn"] == 1], [x for x in rows if x["turn"] == 2])]
    out["turn2_over_turn1_median"] = round(statistics.median(ratios), 4)
    out["turn2_over_turn1_max"] = round(max(ratios), 4)
    out["target"] = "turn 2 TTFT <= 1/3 of turn 1's (issue 22)"
    out["target_met"] = out["turn2_over_turn1_median"] <= 1 / 3
    return out


def chart(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    turns = [f"turn {t}" for t in range(1, TURNS + 1)]
    cached = [s[f"turn{t}"]["ttft_ms_median"] for t in range(1, TURNS + 1)]
    stateless = [s["turn1"]["ttft_ms_median"]] + [s[f"turn{t}"]["stateless_ttft_ms_median"] for t in range(2, TURNS + 1)]
    x = np.arange(TURNS)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    b1 = ax.bar(x - 0.2, cached, 0.4, label="vtprune chat (KV cache of earlier turns reused)")
    b2 = ax.bar(x + 0.2, stateless, 0.4, label="same turn from scratch (vision + whole conversation)")
    ind = [s[f"turn{t}"]["independent_ttft_ms_median"] for t in range(1, TURNS + 1)]
    ax.plot(x, ind, "k^", label="--turns independent (image prefix cached)")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, turns)
    ax.set_ylabel("time to first token, ms (median)")
    m = result["machine"]
    ax.set_title(f"Chat TTFT per turn, embedded model, {result['conversations']} conversations\n"
                 f"{m['cpu']}, {m['threads_used']} thread(s), load {m['load_average_at_start'][0]}", fontsize=9)
    ax.set_ylim(0, max(stateless + cached) * 1.6)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    from vtprune.benchmarks.bench import machine_info, write_json

    p = argparse.ArgumentParser(prog="python -m vtprune.benchmarks.chat_ttft", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="an exported bundle of the embedded model (default: export one now)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--conversations", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from vtprune.export.bundle import export_bundle
            from vtprune.models.config import PruneConfig
            from vtprune.models.loading import default_model_dir

            bundle = Path(tmp) / "embedded"
            export_bundle(default_model_dir(), bundle, PruneConfig())
        pipe = Pipeline(Bundle.open(bundle), threads=args.threads)
        items = conversations(args.conversations + 1)
        measure(pipe, items[:1], args.max_new_tokens)  # warm-up
        t0 = time.time()
        rows = measure(pipe, items[1:], args.max_new_tokens)
    result = {
        "benchmark": "chat_ttft", "command": " ".join(["python -m vtprune.benchmarks.chat_ttft", *(argv or sys.argv[1:])]),
        "model": "embedded (models/embedded/checkpoint), bundle fp32, paper pruning defaults", "conversations": args.conversations,
        "turns": TURNS, "max_new_tokens": args.max_new_tokens, "seconds": round(time.time() - t0, 1),
        "machine": {**machine_info(args.threads, load), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "summary": summarize(rows), "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "chat_ttft.json", result)
    chart(result, out / "chat_ttft.png")
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
