"""Where Stage 2 loses a description: which object patches are still in the KV cache when each object is named.

H2O holds each layer's cache at heavy + recent (= the prompt length with the paper's 0.5/0.5) while a
description of ~50 tokens is written, so by its end half of the prompt is gone. This walks the
description items of the test split with vtprune on the PyTorch reference and, at the step where the
model starts naming its j-th object (its size word), measures the share of the j-th true object's
kept patch tokens still held (mean over layers and KV heads), and whether that object is then named
right (size, colour, shape and region). It also says what the cache holds at a few decode steps.

    python -m vtprune.benchmarks.stage2_retention --limit 200 --out DIR     # the embedded model

Writes `stage2_retention.json` and `.png` (share held against the object's rank in the description).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vtprune.models.embedded import data

PARTS = ("text before the image", "object patches", "background patches", "text after the image", "generated")
STEPS = (0, 15, 30)  # decode steps at which the cache's make-up is reported ("end" is added)


def held_share(positions: list, slots: np.ndarray) -> float:
    """Share of `slots` (position ids) held, over every layer and KV head. positions: per layer [1, H, P]."""
    held = [np.isin(slots, p[0, h].numpy()).mean() for p in positions for h in range(p.shape[1])]
    return float(np.mean(held))


def make_up(positions: list, first: int, labels_kept: np.ndarray, prompt_len: int) -> np.ndarray:
    """Mean number of cache entries per layer and head in each of PARTS."""
    k = len(labels_kept)
    counts = np.zeros(len(PARTS))
    n = 0
    for p in positions:
        for h in range(p.shape[1]):
            ids = p[0, h].numpy()
            vis = (ids >= first) & (ids < first + k)
            obj = np.zeros_like(vis)
            obj[vis] = labels_kept[ids[vis] - first] > 0
            counts += [(ids < first).sum(), obj.sum(), (vis & ~obj).sum(),
                       ((ids >= first + k) & (ids < prompt_len)).sum(), (ids >= prompt_len).sum()]  # fmt: skip
            n += 1
    return counts / n


def describe_one(model, tokenizer, config, sample: data.Sample, max_new: int = 80) -> dict:
    """One description with vtprune: per true object (description order) the share held when it is named."""
    import torch

    from vtprune.models.preprocess import preprocess

    sizes = {tokenizer.tokenizer.token_to_id(z) for z in data.SIZES}
    pixels = torch.from_numpy(preprocess(sample.image, config))
    ids = torch.from_numpy(tokenizer.build(sample.question).input_ids).unsqueeze(0)
    first = int((ids[0] == model.image_token_id).nonzero()[0])
    features = model.encode_image(pixels)
    kept = features.kept_index[0].numpy()
    labels_kept = sample.patch_labels.reshape(-1)[kept]  # [k] 0 = background, i + 1 = object i
    order = data.description_order(sample.objects)
    slots = [first + np.flatnonzero(labels_kept == i + 1) for i in order]
    logits, cache, _ = model.prefill(model.splice(ids, features.embeds))
    prompt_len = cache.next_position
    held_at, parts, out = [], {}, []
    with torch.no_grad():
        for step in range(max_new):
            if step in STEPS:
                parts[str(step)] = make_up(cache.positions, first, labels_kept, prompt_len).tolist()
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            if token in sizes and len(held_at) < len(order):  # the model starts naming an object
                j = len(held_at)
                held_at.append(held_share(cache.positions, slots[j]) if len(slots[j]) else None)
            out.append(token)
            logits = model.decode_step(torch.tensor([[token]]), cache)
    parts["end"] = make_up(cache.positions, first, labels_kept, prompt_len).tolist()
    named = data.parse_description(tokenizer.decode(out))
    truth = [sample.objects[i] for i in order]
    return {
        "held_when_named": held_at + [None] * (len(order) - len(held_at)),
        "named_right": [(o.size, o.colour, o.shape, o.region) in named for o in truth],
        "make_up": parts,
    }


def run(model_dir: Path, limit: int, seed: int) -> dict:
    import torch
    from tqdm import tqdm

    from vtprune.models.config import PruneConfig
    from vtprune.models.loading import ModelFolder

    torch.set_num_threads(int(os.environ.get("VTPRUNE_THREADS", "1")))
    folder = ModelFolder(model_dir)
    tokenizer, config = folder.tokenizer, folder.preprocess
    model = folder.reference(PruneConfig())
    items = [data.KINDS.index("describe") + len(data.KINDS) * j for j in range(limit)]  # make_sample cycles kinds
    rows = [describe_one(model, tokenizer, config, data.make_sample("test", seed, i))
            for i in tqdm(items, desc="descriptions", unit="item")]  # fmt: skip
    by_rank = []
    for j in range(data.MAX_OBJECTS):
        at = [(r["held_when_named"][j], r["named_right"][j]) for r in rows if len(r["named_right"]) > j]
        held = [h for h, _ in at if h is not None]
        by_rank.append({"rank": j + 1, "objects": len(at), "held_mean": float(np.mean(held)) if held else None,
                        "named_right": float(np.mean([n for _, n in at])) if at else None})  # fmt: skip
    pairs = [(h, n) for r in rows for h, n in zip(r["held_when_named"], r["named_right"]) if h is not None]
    make_up_mean = {s: dict(zip(PARTS, np.mean([r["make_up"][s] for r in rows if s in r["make_up"]], 0).round(2).tolist()))
                    for s in [*map(str, STEPS), "end"]}  # fmt: skip
    return {
        "model": str(model_dir), "split": "test", "seed": seed, "descriptions": len(rows),
        "objects": sum(len(r["named_right"]) for r in rows),
        "by_rank": by_rank,
        "held_mean_named_right": float(np.mean([h for h, n in pairs if n])),
        "held_mean_named_wrong": float(np.mean([h for h, n in pairs if not n])) if any(not n for _, n in pairs) else None,
        "cache_make_up": make_up_mean,
    }  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r for r in result["by_rank"] if r["objects"]]
    x = [r["rank"] for r in ranks]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["held_mean"] for r in ranks], "o-", label="object's patches still cached when it is named")
    ax.plot(x, [r["named_right"] for r in ranks], "s--", label="object named right")
    ax.set_xlabel("object's rank in the description")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.set_title(f"Stage 2 (H2O 0.5/0.5) over {result['descriptions']} descriptions")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from vtprune.benchmarks.evaluate import write_json
    from vtprune.models.loading import default_model_dir

    p = argparse.ArgumentParser(prog="python -m vtprune.benchmarks.stage2_retention", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--limit", type=int, default=200, help="description items (the test split's first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.limit < 1:
        p.error(f"--limit: expected an integer >= 1, got {a.limit}")
    result = run(a.model, a.limit, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "stage2_retention.json", result)
    plot(result, a.out / "stage2_retention.png")
    print(json.dumps({"json": str(a.out / "stage2_retention.json"), "png": str(a.out / "stage2_retention.png"),
                      "by_rank": result["by_rank"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
