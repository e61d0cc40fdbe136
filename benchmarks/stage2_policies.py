"""Stage 2's eviction policies side by side, from `vtprune eval` runs: paired differences and a budget chart.

Why: which policy the decoder graph bakes in is a claim about accuracy at a memory budget, and the answer to it
has to come from items no choice looked at. This reads the eval JSONs (`vtprune eval --out DIR --seed S ...`,
one folder per test seed, every run on the same items) and reports, per run: accuracy overall and per kind,
the cache length at the end of each description (mean, and as a share of the same item's sequence without
Stage 2 and without any pruning), and paired differences (mean +- standard error over the items, the same items
answered by both) against Stage 1 only and against full, overall and on descriptions; vtprune with each
policy also against TopK at the same mean k. Seeds are pooled by concatenating their items (each item is one
paired observation). The chart: accuracy (overall, and on descriptions) against the cache budget
(heavy + recent as a share of the prompt), one line per policy, Stage 1 only and full as references.

    python -m vtprune.benchmarks.stage2_policies benchmarks/results/stage2-policies/seed11 \
        benchmarks/results/stage2-policies/seed12 --out benchmarks/results/stage2-policies
    python -m vtprune.benchmarks.stage2_policies --validate 200 --out benchmarks/results/stage2-policies
    python -m vtprune.benchmarks.stage2_policies --validate-split 200 --threads 1 --out /tmp/split

The hyper-parameters (SnapKV's observation window, the visual floor's share; also H2O's heavy/recent split at
the same total) were chosen with `--validate` on the validation split, seed 5, which no test figure uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from vtprune.benchmarks.evaluate import write_json

KINDS = ("exist", "count", "colour", "position", "describe")
PAPER_BUDGET = (0.5, 0.5)


def run_key(report: dict) -> tuple:
    """(method, tokens, policy or None, (heavy_ratio, recent_ratio) or None): one run, whatever its file name."""
    prune = report["prune"]
    stage2 = report["method"] != "full" and prune["text"]
    budget = (prune["heavy_ratio"], prune["recent_ratio"]) if stage2 else None
    if stage2 and (prune.get("heavy_budget") is not None or prune.get("recent_budget") is not None):
        budget = ("abs", prune.get("heavy_budget"), prune.get("recent_budget"))
    tokens = "matched" if report["method"] == "topk" else report.get("tokens")  # each seed's vtprune mean k
    return report["method"], tokens, prune.get("policy", "h2o") if stage2 else None, budget


def label(key: tuple) -> str:
    method, tokens, policy, budget = key
    text = method + (" at vtprune's mean k" if tokens == "matched" else f" k={tokens}" if tokens is not None else "")
    if method != "full" and policy is None:
        text += " (Stage 1 only)"
    if policy is not None:
        text += f" [{policy}, " + (f"{budget[0]:g}/{budget[1]:g}" if budget[0] != "abs" else f"{budget[1]}+{budget[2]} tokens") + "]"
    return text


def load(folder: Path) -> dict[tuple, dict]:
    runs = {}
    for path in sorted(folder.glob("eval-*.json")):
        report = json.loads(path.read_text())
        if "items" in report:
            runs[run_key(report)] = report
    return runs


def paired(a: list[float], b: list[float]) -> dict:
    d = np.asarray(a, float) - np.asarray(b, float)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None, "n": len(d)}


def figures(items: list[dict], stage1: list[dict] | None, full: list[dict] | None) -> dict:
    """Accuracy and cache figures of one run over pooled items (aligned with the references' items)."""
    scores = np.array([r["score"] for r in items])
    desc = [i for i, r in enumerate(items) if r["kind"] == "describe"]
    out = {
        "n": len(items),
        "accuracy": float(scores.mean()),
        "accuracy_se": float(scores.std(ddof=1) / np.sqrt(len(scores))),
        "by_kind": {k: float(np.mean([r["score"] for r in items if r["kind"] == k])) for k in KINDS},
        "visual_tokens_mean": float(np.mean([r["visual_tokens"] for r in items])),
        "describe_cache_end_mean": float(np.mean([items[i]["cache_tokens"] for i in desc])),
        "describe_prompt_mean": float(np.mean([items[i]["total_tokens"] for i in desc])),
    }
    for name, ref in (("stage1", stage1), ("full", full)):
        if ref is None:
            continue
        ratio = [items[i]["cache_tokens"] / ref[i]["cache_tokens"] for i in desc]
        out[f"describe_cache_share_of_{name}"] = float(np.mean(ratio))  # per item, then the mean
        out[f"vs_{name}"] = paired(scores, [r["score"] for r in ref])
        out[f"vs_{name}_describe"] = paired(scores[desc], [ref[i]["score"] for i in desc])
        out[f"ratio_to_{name}"] = float(scores.mean() / np.mean([r["score"] for r in ref]))
    return out


def summarise(folders: list[Path], limit: int | None = None) -> dict:
    """Every run found in all folders (seeds), its items pooled over the seeds. A folder given as A+B merges the
    runs of both (one seed: e.g. its main runs and a budget sweep); `limit` keeps each run's first items."""
    per_seed = []
    for folder in folders:
        runs = {}
        for part in str(folder).split("+"):
            runs.update(load(Path(part)))
        if limit is not None:
            runs = {k: {**r, "items": r["items"][:limit]} for k, r in runs.items() if len(r["items"]) >= limit}
        per_seed.append(runs)
    keys = set(per_seed[0])
    for runs in per_seed[1:]:
        keys &= set(runs)
    seeds = [next(iter(r.values()))["seed"] for r in per_seed]
    pooled = {}
    for key in keys:
        items = []
        for runs in per_seed:
            items += runs[key]["items"]
        pooled[key] = items
    for key, items in pooled.items():  # paired comparisons need the same items in the same order
        first = next(iter(pooled.values()))
        assert [r["question"] for r in items] == [r["question"] for r in first], f"{label(key)}: different items"
    full = next((v for k, v in pooled.items() if k[0] == "full"), None)
    stage1 = next((v for k, v in pooled.items() if k[0] == "vtprune" and k[2] is None), None)
    result = {"seeds": seeds, "folders": [str(f) for f in folders], "runs": {}}
    for key in sorted(pooled, key=label):
        entry = {"method": key[0], "tokens": key[1], "policy": key[2],
                 "budget": list(key[3]) if key[3] is not None else None, **figures(pooled[key], stage1, full)}  # fmt: skip
        entry["per_seed"] = {str(s): {"tokens": runs[key].get("tokens"), **figures(runs[key]["items"], None, None)}
                             for s, runs in zip(seeds, per_seed)}  # fmt: skip
        result["runs"][label(key)] = entry
    # vtprune with each policy against TopK at the same mean k and the same policy and budget, and against the
    # paper's h2o at the same budget
    for key, items in pooled.items():
        if key[0] != "vtprune" or key[2] is None:
            continue
        h2o = (key[0], key[1], "h2o", key[3])
        if key[2] != "h2o" and h2o in pooled:
            desc = [i for i, r in enumerate(items) if r["kind"] == "describe"]
            mine, theirs = [r["score"] for r in items], [r["score"] for r in pooled[h2o]]
            result["runs"][label(key)]["vs_h2o"] = paired(mine, theirs)
            result["runs"][label(key)]["vs_h2o_describe"] = paired([mine[i] for i in desc], [theirs[i] for i in desc])
        topk = [k for k in pooled if k[0] == "topk" and k[2] == key[2] and k[3] == key[3]]
        if topk:
            t = pooled[topk[0]]
            result["runs"][label(key)]["vs_topk"] = {"topk": label(topk[0]), **paired([r["score"] for r in items], [r["score"] for r in t])}
    return result


def plot(result: dict, out: Path, name: str = "stage2_policies") -> Path:
    """Accuracy (overall; descriptions) against the cache budget, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = sorted({r["policy"] for r in runs.values() if r["policy"] and r["method"] == "vtprune"})
    for ax, metric, title in ((axes[0], "accuracy", "all kinds"), (axes[1], "describe", "descriptions")):
        for i, policy in enumerate(policies):
            pts = sorted((r["budget"][0] + r["budget"][1], r["accuracy"] if metric == "accuracy" else r["by_kind"]["describe"])
                         for r in runs.values() if r["method"] == "vtprune" and r["policy"] == policy
                         and isinstance(r["budget"][0], float))  # fmt: skip
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=f"C{i}", label=policy + (" (paper)" if policy == "h2o" else ""))
        for ref, color, ls in (("vtprune (Stage 1 only)", "C7", "--"), ("full", "k", ":")):
            if ref in runs:
                y = runs[ref]["accuracy"] if metric == "accuracy" else runs[ref]["by_kind"]["describe"]
                ax.axhline(y, color=color, ls=ls, lw=1, label=ref)
        ax.axvline(sum(PAPER_BUDGET), color="grey", lw=0.6)
        ax.annotate("paper's budget", (sum(PAPER_BUDGET), 0.62), xycoords=("data", "axes fraction"), fontsize=7,
                    color="grey", rotation=90, ha="right", va="top")
        shares = {}  # budget -> the cache at the end of a description as a share of the Stage-1-only sequence
        for r in runs.values():
            if r["method"] == "vtprune" and r["policy"] and isinstance(r["budget"][0], float) and "describe_cache_share_of_stage1" in r:
                shares[r["budget"][0] + r["budget"][1]] = r["describe_cache_share_of_stage1"]
        for x, share in shares.items():
            ax.annotate(f"cache at the end:\n{share:.0%} of Stage 1 only's", (x, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=6, ha="center", va="bottom", color="grey")
        ax.set_xlabel("cache budget, heavy + recent (share of the prompt after Stage 1)")
        ax.set_ylabel("mean item score")
        seeds = result["seeds"]
        ax.set_title(f"vtprune, {title} (test seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, "
                     f"n={next(iter(runs.values()))['n']})", fontsize=10)  # fmt: skip
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.15)  # the lowest point clear of the cache notes along the bottom
    axes[1].legend(fontsize=8, loc="center left")
    fig.tight_layout()
    path = out / f"{name}.png"
    tmp = out / f".{name}.png.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def validate(configs: dict[str, dict], n: int, split: str = "val", seed: int | tuple[int, ...] = 5,
             all_kinds: bool = False) -> dict:
    """Hyper-parameters are chosen here, never on the test seeds: the first n descriptions (`make_sample(...,
    kind="describe")`) of a validation split, greedy, on the PyTorch reference; per config the mean score, its
    standard error and the cache at the end. The short kinds are left out: at the paper's budget their first
    word comes from the prefill, which every policy computes alike. With `all_kinds` the first n items of the
    split instead (kinds cycling, as `vtprune eval` answers them): accuracy overall and per kind besides, the
    describe figures and the cache then over the descriptions among them. Several seeds: n items of each, pooled
    (in seed order; `seeds` per item)."""
    from vtprune.benchmarks.evaluate import torch_answerer
    from vtprune.models.config import PruneConfig
    from vtprune.models.embedded import data
    from vtprune.models.embedded.scoring import MAX_NEW_TOKENS, SHORT_ANSWER_TOKENS
    from vtprune.models.loading import default_model_dir

    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    out = {"split": split, "seed": seed if isinstance(seed, int) else list(seeds), "n": n, "all_kinds": all_kinds, "configs": {}}
    for name, kw in configs.items():
        answer, _ = torch_answerer(default_model_dir(), "vtprune", None, PruneConfig(**kw))
        scores, cache, kinds = [], [], []
        for sd, i in ((sd, i) for sd in seeds for i in range(n)):
            s = data.make_sample(split, sd, i, kind=None if all_kinds else "describe")
            a = answer(s.image, s.question, MAX_NEW_TOKENS.get(s.kind, SHORT_ANSWER_TOKENS))
            scores.append(data.score(s.kind, a.text, s.answer)), cache.append(a.cache_tokens), kinds.append(s.kind)
        desc = [i for i, k in enumerate(kinds) if k == "describe"]
        d_scores = [scores[i] for i in desc]
        entry = {"prune": kw, "describe": float(np.mean(d_scores)),
                 "se": float(np.std(d_scores, ddof=1) / np.sqrt(len(d_scores))) if len(d_scores) > 1 else None,
                 "cache_end_mean": float(np.mean([cache[i] for i in desc]))}  # fmt: skip
        if all_kinds:
            entry |= {"n_describe": len(desc), "accuracy": float(np.mean(scores)),
                      "accuracy_se": float(np.std(scores, ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else None,
                      "by_kind": {k: float(np.mean([x for x, kk in zip(scores, kinds) if kk == k])) for k in KINDS if k in kinds},
                      "kinds": kinds, "cache_end": [cache[i] for i in desc]}  # fmt: skip
        else:
            entry["cache_end"] = cache
        if len(seeds) > 1:
            entry["seeds"] = [sd for sd in seeds for _ in range(n)]
            entry["per_seed"] = {str(sd): {"describe": float(np.mean([scores[i] for i in desc if i // n == j])),
                                           **({"accuracy": float(np.mean(scores[j * n:(j + 1) * n]))} if all_kinds else {})}
                                 for j, sd in enumerate(seeds)}  # fmt: skip
        out["configs"][name] = entry | {"scores": scores}
        print(f"{name}: describe {entry['describe']:.4f} cache {entry['cache_end_mean']:.1f}"
              + (f" overall {entry['accuracy']:.4f}" if all_kinds else "") + f" ({n} items x {len(seeds)} seeds)",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def validate_budget(n: int, shares: tuple[float, ...] = (0.5, 0.475, 0.45, 0.425), cap: float = 0.6) -> dict:
    """The default budget (heavy = recent = share of the prompt) under snapkv: the best validation score among the
    shares whose cache at the end of a description is at most `cap` of Stage 1 only's (issue 23's memory target)."""
    configs = {"stage1": {"text": False}}
    configs |= {f"snapkv-{r:g}": {"policy": "snapkv", "heavy_ratio": r, "recent_ratio": r} for r in shares}
    out = validate(configs, n)
    stage1 = out["configs"]["stage1"]["cache_end_mean"]
    for c in out["configs"].values():
        c["cache_share_of_stage1"] = c["cache_end_mean"] / stage1
    fits = {k: c for k, c in out["configs"].items() if k != "stage1" and c["cache_share_of_stage1"] <= cap}
    best = max(fits, key=lambda k: fits[k]["describe"]) if fits else None
    out["chosen"] = {"config": best, "rule": f"the best describe score with the cache at most {cap:.0%} of Stage 1 only's"}
    return out


UNEVEN_SPLITS = ((0.65, 0.30), (0.55, 0.40), (0.40, 0.55), (0.30, 0.65))  # heavy/recent at the default's total


def validate_split(n: int, splits: tuple[tuple[float, float], ...] = UNEVEN_SPLITS, windows: tuple[int, ...] = (16,),
                   cap: float = 0.6, seed: int | tuple[int, ...] = 5, all_kinds: bool = False) -> dict:
    """Uneven heavy/recent splits of snapkv's cache against the default (PruneConfig's policy, budget and window) on
    the same validation items: per config its cache at the end of a description as a share of Stage 1 only's
    (ratio of the means, `validate_budget`'s rule; and the mean of the per-item ratios), and the paired difference
    (mean +- standard error over the items) against the default, on descriptions and, with `all_kinds`, overall.
    Chosen: `validate_budget`'s rule (the best describe score with the cache at most `cap` of Stage 1 only's); it
    beats the default only if that paired difference on descriptions is above two standard errors. Several seeds
    (validation seeds only): their items pooled, each one paired observation."""
    from vtprune.models.config import PruneConfig

    base = PruneConfig()
    default = {"policy": base.policy, "heavy_ratio": base.heavy_ratio, "recent_ratio": base.recent_ratio,
               "snap_window": base.snap_window}  # fmt: skip
    configs = {"stage1": {"text": False}, "default": default}
    for w in windows:
        for h, r in splits:
            kw = {"policy": "snapkv", "heavy_ratio": h, "recent_ratio": r, "snap_window": w}
            if kw != default:
                configs[f"snapkv-{h:g}-{r:g}" + (f"-w{w}" if w != base.snap_window else "")] = kw
    out = validate(configs, n, seed=seed, all_kinds=all_kinds)
    runs = out["configs"]
    stage1, ref = runs["stage1"], runs["default"]
    desc = [i for i, k in enumerate(ref.get("kinds", ["describe"] * len(ref["scores"]))) if k == "describe"]
    for name, c in runs.items():
        c["cache_share_of_stage1"] = c["cache_end_mean"] / stage1["cache_end_mean"]
        c["cache_share_of_stage1_per_item"] = float(np.mean([a / b for a, b in zip(c["cache_end"], stage1["cache_end"])]))
        c["vs_stage1_describe"] = paired([c["scores"][i] for i in desc], [stage1["scores"][i] for i in desc])
        if name not in ("stage1", "default"):
            c["vs_default_describe"] = paired([c["scores"][i] for i in desc], [ref["scores"][i] for i in desc])
            if all_kinds:
                c["vs_default"] = paired(c["scores"], ref["scores"])
    fits = {k: c for k, c in runs.items() if k != "stage1" and c["cache_share_of_stage1"] <= cap}
    best = max(fits, key=lambda k: fits[k]["describe"]) if fits else None
    d = runs[best].get("vs_default_describe") if best else None
    out["chosen"] = {"config": best, "rule": f"the best describe score with the cache at most {cap:.0%} of Stage 1 only's",
                     "beats_default_by_2se": bool(d and d["se"] and d["mean"] > 2 * d["se"])}  # fmt: skip
    return out


def _split_arg(text: str) -> tuple[float, float]:
    heavy, _, recent = text.partition("/")
    try:
        return float(heavy), float(recent)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEAVY/RECENT shares of the prompt, e.g. 0.65/0.30, got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path, help="one `vtprune eval --out` folder per test seed (A+B: both, one seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="each run's first N items only (runs with fewer are left out)")
    p.add_argument("--name", default="stage2_policies", help="file stem of the JSON and the chart")
    p.add_argument("--validate", type=int, default=None, metavar="N",
                   help="instead: the hyper-parameter choice on the first N descriptions of the validation split (seed 5)")
    p.add_argument("--validate-budget", type=int, default=None, metavar="N",
                   help="instead: the default budget's choice on the first N validation descriptions (snapkv)")
    p.add_argument("--validate-split", type=int, default=None, metavar="N",
                   help="instead: uneven heavy/recent splits against the default on the first N validation descriptions "
                        "(paired; writes validation-split.json unless --name)")  # fmt: skip
    p.add_argument("--splits", type=_split_arg, nargs="+", default=list(UNEVEN_SPLITS), metavar="HEAVY/RECENT",
                   help="--validate-split: the splits (default " + " ".join(f"{h:g}/{r:g}" for h, r in UNEVEN_SPLITS) + ")")
    p.add_argument("--snap-windows", type=int, nargs="+", default=[16], metavar="W", help="--validate-split: snapkv windows")
    p.add_argument("--seed", type=int, nargs="+", default=[5], help="--validate-split: validation seeds, pooled (default 5)")
    p.add_argument("--all-kinds", action="store_true",
                   help="--validate-split: the first N items of every kind (overall accuracy too), not N descriptions")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.validate_split:
        args.out.mkdir(parents=True, exist_ok=True)
        seed = args.seed[0] if len(args.seed) == 1 else tuple(args.seed)
        result = validate_split(args.validate_split, tuple(args.splits), tuple(args.snap_windows), seed=seed,
                                all_kinds=args.all_kinds)  # fmt: skip
        result["command"] = "python -m vtprune.benchmarks.stage2_policies " + " ".join(argv if argv is not None else sys.argv[1:])
        name = args.name if args.name != "stage2_policies" else "validation-split"
        return write_json(args.out / f"{name}.json", result)
    if args.validate:  # the policies at the paper's budget
        paper = {"heavy_ratio": PAPER_BUDGET[0], "recent_ratio": PAPER_BUDGET[1]}
        configs = {"stage1": {"text": False}, "h2o": {"policy": "h2o", **paper}, "tova": {"policy": "tova", **paper}}
        configs |= {f"snapkv-w{w}": {"policy": "snapkv", "snap_window": w, **paper} for w in (2, 4, 8, 16, 32)}
        configs |= {f"vfloor-{f:g}": {"policy": "vfloor", "visual_floor": f, **paper} for f in (0.1, 0.25, 0.5, 0.75)}
        configs |= {f"h2o-{h:g}-{1 - h:g}": {"policy": "h2o", "heavy_ratio": h, "recent_ratio": 1 - h} for h in (0.25, 0.625, 0.75)}
        args.out.mkdir(parents=True, exist_ok=True)
        return write_json(args.out / "validation.json", validate(configs, args.validate))
    if args.validate_budget:
        args.out.mkdir(parents=True, exist_ok=True)
        result = validate_budget(args.validate_budget)
        result["command"] = f"python -m vtprune.benchmarks.stage2_policies --validate-budget {args.validate_budget} --out {args.out}"
        return write_json(args.out / "validation-budget.json", result)
    result = summarise(args.folders, args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    result["command"] = "python -m vtprune.benchmarks.stage2_policies " + " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    result["png"] = str(plot(result, args.out, args.name))
    write_json(args.out / f"{args.name}.json", result)
    for name, r in result["runs"].items():
        s1 = r.get("vs_stage1", {})
        print(f"{name:38s} acc {r['accuracy']:.4f} desc {r['by_kind']['describe']:.3f} cache_end {r['describe_cache_end_mean']:.1f}"
              + (f" ({r['describe_cache_share_of_stage1']:.2f} of stage1)" if "describe_cache_share_of_stage1" in r else "")
              + (f" vs stage1 {s1['mean']:+.4f}+-{s1['se']:.4f}" if s1 and s1["se"] else "")
              + (f" vs h2o {r['vs_h2o']['mean']:+.4f}+-{r['vs_h2o']['se']:.4f}" if "vs_h2o" in r else "")
              + (f" vs {r['vs_topk']['topk']} {r['vs_topk']['mean']:+.4f}+-{r['vs_topk']['se']:.4f}" if "vs_topk" in r else ""))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
