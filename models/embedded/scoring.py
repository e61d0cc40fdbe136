"""How answers to the embedded question set are scored: per item, per kind, POPE's figures, where Stage 1 looked.

Why here, beside the data set: the rule is the data set's (`data.score`: a short answer is right when its first
word equals the truth, case and punctuation ignored; a description scores the F1 of the (size, colour, shape,
region) tuples it names), and every accuracy figure of the project comes out of `run` + `summarise`: the eval
harness (`vtprune eval`, benchmarks/evaluate.py) and the quantization report (quant/report.py) alike. Nothing
here runs a model: `run` takes any `answer(image, question, max_new) -> Answer`.

`accuracy` is the mean item score over all kinds. Existence questions also get POPE's figures (accuracy,
precision, recall, F1 with "yes" as the positive class, yes-ratio) and accuracy per negative type. Where the
model's patch grid is the data set's 24 x 24, the report also says where Stage 1 looked: the CLS attention mass
on object patches (`cls_on_objects_mean`), the share of object patches kept (`object_recall_mean`) and of
objects with at least one kept patch (`objects_seen_mean`), beside the share of patches objects cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from vtprune.models.embedded import data

MAX_NEW_TOKENS = {"describe": 80}  # a description of 5 objects is ~50 tokens; other answers are one word
SHORT_ANSWER_TOKENS = 4


@dataclass
class Answer:
    """What one method did with one item."""

    text: str
    visual_tokens: int  # kept by Stage 1
    total_tokens: int  # the prompt the LLM sees after Stage 2 (prefill)
    cache_tokens: int  # KV cache length per layer at the end of decoding
    kept_index: list[int]
    cls_scores: np.ndarray | None  # [n] Stage-1 scores, when the method computes them


@dataclass
class Record:
    """One answered item, scored."""

    kind: str
    question: str
    answer: str
    prediction: str
    score: float
    neg_type: str | None
    visual_tokens: int
    total_tokens: int
    cache_tokens: int
    cls_on_objects: float | None = None  # CLS attention mass on object patches
    object_recall: float | None = None  # share of object patches Stage 1 kept
    objects_seen: float | None = None  # share of objects with at least one kept patch
    object_share: float | None = None  # share of patches covered by objects




def pope(records: list[Record]) -> dict:
    """POPE's figures on the existence items: "yes" is the positive class; any other answer counts as "no"."""
    exist = [r for r in records if r.kind == "exist"]
    if not exist:
        return {}
    said_yes = [_first_word(r.prediction) == "yes" for r in exist]
    truth = [r.answer == "yes" for r in exist]
    tp = sum(p and t for p, t in zip(said_yes, truth))
    fp = sum(p and not t for p, t in zip(said_yes, truth))
    fn = sum(t and not p for p, t in zip(said_yes, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    by_neg = {}
    for neg in data.NEG_TYPES:
        rs = [r for r in exist if r.neg_type == neg]
        if rs:
            by_neg[neg] = float(np.mean([r.score for r in rs]))
    return {
        "n": len(exist),
        "accuracy": float(np.mean([r.score for r in exist])),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(said_yes) / len(exist),
        "negatives_accuracy": by_neg,
    }


def summarise(records: list[Record]) -> dict:
    """The report of one run: overall and per-kind scores, POPE figures, token counts, Stage-1 concentration."""
    if not records:
        raise ValueError("no records to summarise")
    by_kind = {k: float(np.mean([r.score for r in records if r.kind == k])) for k in data.KINDS if any(r.kind == k for r in records)}
    visual = [r.visual_tokens for r in records]
    describe = [r for r in records if r.kind == "describe"]
    out = {
        "n": len(records),
        "accuracy": float(np.mean([r.score for r in records])),
        "by_kind": by_kind,
        "n_by_kind": {k: sum(r.kind == k for r in records) for k in by_kind},
        "exist_pope": pope(records),
        "describe_exact_match": float(np.mean([r.prediction.strip() == r.answer for r in describe])) if describe else None,
        "visual_tokens_mean": float(np.mean(visual)),
        "visual_tokens_min": int(min(visual)),
        "visual_tokens_max": int(max(visual)),
        "total_tokens_mean": float(np.mean([r.total_tokens for r in records])),
        "cache_tokens_mean": float(np.mean([r.cache_tokens for r in records])),
    }
    for key in ("cls_on_objects", "object_recall", "objects_seen", "object_share"):
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
    return out


def object_figures(labels: np.ndarray, kept: list[int], scores: np.ndarray | None, n: int) -> dict:
    """Where Stage 1 looked, for one image: CLS mass on object patches, object patches kept, objects seen.

    labels [24, 24] (0 = background, i + 1 = object i); kept: patch indices of a model with n patches;
    {} where the model's patch grid is not the data set's.
    """
    objects = labels.reshape(-1)  # [576]
    if n != objects.shape[0]:
        return {}
    on = objects > 0
    kept_labels = set(objects[kept].tolist())
    ids = [i for i in np.unique(objects) if i > 0]
    return {
        "cls_on_objects": float(scores[on].sum()) if scores is not None else None,
        "object_recall": float(on[kept].sum() / on.sum()) if on.any() else None,
        "objects_seen": float(np.mean([i in kept_labels for i in ids])) if ids else None,
        "object_share": float(on.mean()),
    }


def _first_word(text: str) -> str:
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return words[0] if words else ""


def run(answer: Callable, n: int, split: str, seed: int, limit: int, desc: str = "eval") -> list[Record]:
    """Answer the first `limit` items of a split (tqdm progress on stderr) and score each."""
    from tqdm import tqdm

    records = []
    for i in tqdm(range(limit), desc=desc, unit="item", mininterval=1.0):
        s = data.make_sample(split, seed, i)
        a = answer(s.image, s.question, MAX_NEW_TOKENS.get(s.kind, SHORT_ANSWER_TOKENS))
        records.append(Record(s.kind, s.question, s.answer, a.text, data.score(s.kind, a.text, s.answer),
                              s.meta.get("neg_type"), a.visual_tokens, a.total_tokens, a.cache_tokens,
                              **object_figures(s.patch_labels, a.kept_index, a.cls_scores, n)))  # fmt: skip
    return records

