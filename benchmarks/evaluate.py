"""`vtprune eval`: accuracy on the procedural question set, per question kind, with the tokens each method keeps.

Why a harness of its own, and why in benchmarks/: every claim of the project (the pruned model still answers
right, a quantized bundle still answers right) is a figure from here, and it runs the PyTorch reference, its
bitsandbytes variants and ONNX bundles alike, so it sits at the top of the flow, above all of them. Items come
from `vtprune.models.embedded.data` (kinds cycle, so any prefix of a split is balanced); inputs go through the
model folder's (or bundle's) preprocessing and prompt code (`vtprune.models.preprocess`, `vtprune.models.prompt`),
the one place for both; answers are greedy. Scoring and the per-kind report are
`vtprune.models.embedded.scoring` (the same rule training validates with); the answer on a bundle variant is
`vtprune.quant.report.variant_answerer` (the quantization report runs it too).

Token figures: `visual_tokens_*` are the visual tokens Stage 1 hands to the LLM (of `visual_tokens_total`);
`total_tokens_mean` is the prompt the LLM runs after Stage 2's prefill selection (text + visual);
`cache_tokens_mean` is the KV-cache length per layer when the answer ends (held at the H2O budget).

Methods (Stage 1; Stage 2 follows the pruning knobs for every method but `full`):
- `full`: no pruning at all (all visual tokens, no H2O);
- `vtprune`: the long-tail split (paper Eq. 2-3) inside the ViT;
- `topk`, `prumerge`, `visionzip`: `vtprune.models.baselines` at `--tokens K` (PruMerge without `--tokens` is
  adaptive: its IQR rule); `--sweep` runs all five, the baselines at vtprune's mean k (and PruMerge's IQR rule),
  and vtprune once more with Stage 2 off (the paper's Table 2: what H2O costs; files and series say "stage1").
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig
from vtprune.models.embedded import data
from vtprune.models.embedded.scoring import Answer, run, summarise

METHODS = ("full", "vtprune", "topk", "prumerge", "visionzip")
DEFAULT_LIMIT = 250  # the first 250 items of a split: 50 of each kind (the model card's test figure)
PLOT_NAME = "accuracy_vs_tokens.png"


# ---------------------------------------------------------------- answering


def torch_answerer(model_dir: Path, method: str, tokens: int | None, prune, bnb: str | None = None):
    """(answer(image, question, max_new) -> Answer, number of patches) on the PyTorch reference."""
    from vtprune.models.loading import ModelFolder

    folder = ModelFolder(model_dir)  # a bad checkpoint fails here, before torch is imported
    import torch

    from vtprune.models import baselines
    from vtprune.models.preprocess import preprocess
    from vtprune.quant.bnb import quantize_bnb

    tokenizer, config = folder.tokenizer, folder.preprocess
    model = folder.reference(prune, (lambda hf: quantize_bnb(hf, bnb)) if bnb else None)
    n = model.num_patches
    _check_tokens(method, tokens, n)
    selector, merge = baselines.stage1(method, n, tokens, prune.k_min)
    eos = tokenizer.eos_token_id

    @torch.no_grad()
    def answer(image, question: str, max_new: int) -> Answer:
        pixels = torch.from_numpy(preprocess(image, config))  # [1, 3, H, W]
        ids = torch.from_numpy(tokenizer.build(question).input_ids).unsqueeze(0)  # [1, T]
        features = model.encode_image(pixels, selector, merge)
        logits, cache, positions = model.prefill(model.splice(ids, features.embeds), model.image_span(ids, features.embeds))
        out: list[int] = []
        for step in range(max_new):
            token = int(logits[0, -1].argmax())  # greedy
            if token == eos:
                break
            out.append(token)
            if step < max_new - 1:
                logits = model.decode_step(torch.tensor([[token]]), cache)
        scores = features.cls_scores[0].float().numpy() if features.cls_scores is not None else None
        return Answer(tokenizer.decode(out), features.kept_index.shape[1], positions.shape[1], cache.length,
                      features.kept_index[0].tolist(), scores)  # fmt: skip

    return answer, n


def bundle_answerer(bundle_dir: str, precision: str, method: str, tokens: int | None, prune,
                    provider: str | None = None, threads: int = 0):
    """(answer, number of patches) on an ONNX bundle: Stage 1 is the graph's own split (or off for `full`);
    provider and threads are ONNX Runtime's (None, 0: the best available, all cores)."""
    from vtprune.quant.report import variant_answerer
    from vtprune.runtime.bundle import Bundle

    if method not in ("full", "vtprune"):
        raise UserError("--method", f"{method} runs on the PyTorch reference (--model); a bundle's vision graph holds vtprune's own split")
    bundle = Bundle.open(bundle_dir)
    bundle.check_prune(prune)
    exported = bundle.manifest["prune"]
    # The eviction policy is part of the decoder graph: the report says the bundle's (one from before policies is h2o).
    prune = replace(prune, policy=exported.get("policy", "h2o"), snap_window=exported.get("snap_window", prune.snap_window),
                    visual_floor=exported.get("visual_floor", prune.visual_floor))  # fmt: skip
    answer, n = variant_answerer(bundle, precision, prune, provider, threads)
    _check_tokens(method, tokens, n)
    return answer, n


# ---------------------------------------------------------------- files and the plot


def write_json(path: Path, obj) -> Path:
    """Write under a temporary name, then rename (no partial file on an interrupt)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def series(report: dict) -> str:
    """A run's name in plots and tables: a pruned method with Stage 2 off is its own series (the paper's Table 2),
    and so is each eviction policy but the default."""
    prune = report["prune"]
    stage1_only = report["method"] != "full" and not prune["text"]
    policy = prune.get("policy", "h2o")
    other = report["method"] != "full" and prune["text"] and policy != PruneConfig().policy
    return report["method"] + (" (Stage 1 only)" if stage1_only else "") + (f" ({policy})" if other else "")


def result_name(report: dict) -> str:
    """eval-<method>-<split>[-k<K>][-stage1][-<policy> if not the default][-b<heavy>-<recent> if not the default].json"""
    prune = report["prune"]
    stage1_only = report["method"] != "full" and not prune["text"]
    stage2 = report["method"] != "full" and prune["text"]
    policy = prune.get("policy", "h2o")
    budget = (prune.get("heavy_budget"), prune.get("recent_budget"), prune["heavy_ratio"], prune["recent_ratio"])
    default = PruneConfig()
    return (f"eval-{report['method']}-{report['split']}" + (f"-k{report['tokens']}" if report["tokens"] is not None else "")
            + ("-stage1" if stage1_only else "") + (f"-{policy}" if stage2 and policy != default.policy else "")
            + (f"-b{_budget_tag(prune)}" if stage2 and budget != (None, None, default.heavy_ratio, default.recent_ratio) else "") + ".json")  # fmt: skip


def _budget_tag(prune: dict) -> str:
    heavy = prune["heavy_budget"] if prune.get("heavy_budget") is not None else prune["heavy_ratio"]
    recent = prune["recent_budget"] if prune.get("recent_budget") is not None else prune["recent_ratio"]
    return f"{heavy:g}-{recent:g}"


def plot_accuracy_vs_tokens(folder: Path) -> Path | None:
    """Accuracy against mean visual tokens, one series per method, from every eval-*.json in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (ScalarFormatter below)

    points: dict[str, list[tuple[float, float]]] = {}
    total = None
    for path in sorted(folder.glob("eval-*.json")):
        try:
            r = json.loads(path.read_text())
            points.setdefault(series(r), []).append((float(r["visual_tokens_mean"]), float(r["accuracy"])))
            total = r.get("visual_tokens_total", total)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"full": "k*", "vtprune": "C3o-", "vtprune (Stage 1 only)": "C3x", "topk": "C0s-", "prumerge": "C1^-",
              "visionzip": "C2D-"}  # fmt: skip
    order = [*METHODS, "vtprune (Stage 1 only)"]
    for method, pts in sorted(points.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, styles.get(method, "o-"), label=method, markersize=9 if method in ("full", "vtprune") else 6,
                zorder=5 if method == "vtprune" else 3, mfc="none" if method == "vtprune" else None, mew=2 if method == "vtprune" else 1)
        if method == "full":
            ax.axhline(ys[-1], color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    lo = min(x for pts in points.values() for x, _ in pts) / 1.5
    hi = max(x for pts in points.values() for x, _ in pts) * 1.3
    ax.set_xticks([t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 576, 1024, 2304) if lo <= t <= hi])
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"visual tokens kept (mean{f' of {total}' if total else ''})")
    ax.set_ylabel("accuracy (mean item score)")
    ax.set_title("Accuracy vs visual tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = folder / PLOT_NAME
    tmp = folder / f".{PLOT_NAME}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- the command


def main(args) -> dict:
    from vtprune.models.config import prune_config_from_args
    from vtprune.models.loading import default_model_dir

    if args.bundle is not None and args.model is not None:
        raise UserError("--bundle", "give either --model (PyTorch reference) or --bundle (ONNX), not both")
    if args.bundle is not None and any(getattr(args, k, None) is not None for k in ("policy", "snap_window", "visual_floor")):
        raise UserError("--policy", "a bundle's eviction policy is fixed at export (its manifest's prune.policy); "
                                    "re-export with --policy to change it, or evaluate the PyTorch reference (--model)")
    if args.bundle is not None and args.bnb:
        raise UserError("--bnb", "bitsandbytes applies to the PyTorch reference (--model), not to an ONNX bundle")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit", f"expected an integer >= 1, got {args.limit}")
    if args.tokens is not None and args.tokens < 1:
        raise UserError("--tokens", f"expected an integer >= 1, got {args.tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads", f"expected an integer >= 1, got {args.threads}")
    if args.threads is not None and args.bundle is None:  # on a bundle they are ONNX Runtime's (bundle_answerer)
        import torch

        torch.set_num_threads(args.threads)
    seed = 0 if args.seed is None else args.seed
    limit = DEFAULT_LIMIT if args.limit is None else args.limit
    prune = prune_config_from_args(args)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError("--out", f"{out_dir} exists and is not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else default_model_dir()
    source = {"bundle": str(args.bundle), "precision": args.precision} if args.bundle else {"model": str(model_dir), "bnb": args.bnb}

    def one(method: str, tokens: int | None, stage2: bool = True) -> dict:
        cfg = replace(prune, visual=False, text=False) if method == "full" else prune  # scores still from prune_layer
        cfg = replace(cfg, text=cfg.text and stage2)
        if args.bundle is not None:
            answer, n = bundle_answerer(args.bundle, args.precision, method, tokens, cfg, args.provider, args.threads or 0)
        else:
            answer, n = torch_answerer(model_dir, method, tokens, cfg, args.bnb)
        records = run(answer, n, args.split, seed, limit, desc=f"{method}" + (f" k={tokens}" if tokens else ""))
        report = {"method": method, "tokens": tokens, "split": args.split, "seed": seed, **source,
                  "visual_tokens_total": n, "prune": cfg.to_dict(), **summarise(records)}  # fmt: skip
        if out_dir is not None:
            report["json"] = str(write_json(out_dir / result_name(report),
                                            {**report, "items": [asdict(r) for r in records]}))  # fmt: skip
        return report

    if args.sweep:
        runs = {"full": one("full", None), "vtprune": one("vtprune", None)}
        if prune.text:  # the paper's Table 2: what Stage 2 costs on top of Stage 1
            runs["vtprune-stage1"] = one("vtprune", None, stage2=False)
        k = max(1, int(round(runs["vtprune"]["visual_tokens_mean"])))
        if args.bundle is None:
            for method in ("topk", "prumerge", "visionzip"):
                runs[method] = one(method, k)
            runs["prumerge-iqr"] = one("prumerge", None)  # PruMerge's own adaptive count, for reference
        result = {"sweep": True, "matched_tokens": k, "runs": runs}
    else:
        result = one(args.method, args.tokens)
    if out_dir is not None:
        png = plot_accuracy_vs_tokens(out_dir)
        result["png"] = str(png) if png else None
    if not args.json:
        print_report(result)
    return result


def print_report(result: dict) -> None:
    """One column per method, one row per figure (fits a terminal for a whole sweep)."""
    from rich.console import Console
    from rich.table import Table

    runs = list(result["runs"].values()) if result.get("sweep") else [result]
    table = Table(title=f"vtprune eval ({runs[0]['split']} split, seed {runs[0]['seed']})")
    table.add_column("")
    for r in runs:
        label = series(r) + (f" k={r['tokens']}" if r.get("tokens") else " (IQR)" if r["method"] == "prumerge" else "")
        table.add_column(label, justify="right")
    rows = [("items", lambda r: str(r["n"])), ("accuracy", lambda r: f"{r['accuracy']:.3f}")]
    rows += [(k, lambda r, k=k: f"{r['by_kind'][k]:.3f}" if k in r["by_kind"] else "-") for k in data.KINDS]
    rows += [
        ("exist F1 (POPE)", lambda r: f"{r['exist_pope']['f1']:.3f}" if r["exist_pope"] else "-"),
        ("visual tokens", lambda r: f"{r['visual_tokens_mean']:.1f} ({r['visual_tokens_min']}-{r['visual_tokens_max']})"),
        ("LLM prompt tokens", lambda r: f"{r['total_tokens_mean']:.1f}"),
        ("object patches kept", lambda r: f"{r['object_recall_mean']:.3f}" if r["object_recall_mean"] is not None else "-"),
        ("objects seen", lambda r: f"{r['objects_seen_mean']:.3f}" if r["objects_seen_mean"] is not None else "-"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(r) for r in runs))
    console = Console()
    console.print(table)
    scored = [r for r in runs if r.get("cls_on_objects_mean") is not None]
    if scored:
        r = scored[0]
        console.print(f"CLS attention on object patches (layer {r['prune']['prune_layer']}): "
                      f"{r['cls_on_objects_mean']:.3f} of its mass; objects cover {r['object_share_mean']:.3f} of the patches")  # fmt: skip
    if result.get("png"):
        console.print(f"plot: {result['png']}")


def _check_tokens(method: str, tokens: int | None, n: int) -> None:
    if method in ("topk", "visionzip") and tokens is None:
        raise UserError("--tokens", f"{method} keeps a fixed number of visual tokens: expected --tokens K (1..{n}), or --sweep")
    if method in ("full", "vtprune") and tokens is not None:
        raise UserError("--tokens", f"{method} decides its own token count; --tokens applies to topk, prumerge and visionzip")
    if tokens is not None and not 1 <= tokens <= n:
        raise UserError("--tokens", f"expected 1..{n} (the model's patches), got {tokens}")

