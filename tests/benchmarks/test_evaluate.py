"""`vtprune eval` and the Stage-1 baselines: the harness runs, its figures are right, the baselines keep what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtprune.cli import main
from vtprune.models import baselines
from vtprune.models.embedded import data
from vtprune.models.embedded.scoring import Record, object_figures, summarise

KEYS = ("n", "accuracy", "by_kind", "visual_tokens_mean", "visual_tokens_min", "visual_tokens_max", "total_tokens_mean",
        "exist_pope")  # fmt: skip


def eval_json(capsys, *argv) -> dict:
    code = main(["eval", *map(str, argv), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


# ---------------------------------------------------------------- the command


def test_eval_limit_json_has_the_keys(tiny_llava_dir, capsys):
    r = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 4)
    for key in KEYS:
        assert key in r, key
    assert r["n"] == 4 and r["method"] == "vtprune"
    assert set(r["by_kind"]) == {"exist", "count", "colour", "position"}  # kinds cycle: the first 4 items
    assert 1 <= r["visual_tokens_min"] <= r["visual_tokens_mean"] <= r["visual_tokens_max"] <= 64
    assert 0.0 <= r["accuracy"] <= 1.0
    # 0.5 / 0.5 budgets drop nothing at prefill: the LLM sees the text and every kept visual token
    assert r["total_tokens_mean"] > r["visual_tokens_mean"]


def test_full_keeps_every_token_and_topk_exactly_k(tiny_llava_dir, capsys):
    full = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 3, "--method", "full")
    assert full["visual_tokens_min"] == full["visual_tokens_max"] == 64
    for method in ("topk", "visionzip", "prumerge"):
        r = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 3, "--method", method, "--tokens", 9)
        assert r["visual_tokens_min"] == r["visual_tokens_max"] == 9, method
        # same prompt text, 64 - 9 fewer visual tokens
        assert r["total_tokens_mean"] == pytest.approx(full["total_tokens_mean"] - 55)


def test_out_writes_json_and_plot(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    eval_json(capsys, "--model", tiny_llava_dir, "--limit", 2, "--method", "full", "--out", out)
    r = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 2, "--method", "topk", "--tokens", 5, "--out", out)
    assert sorted(p.name for p in out.glob("eval-*.json")) == ["eval-full-test.json", "eval-topk-test-k5.json"]
    saved = json.loads((out / "eval-topk-test-k5.json").read_text())
    assert saved["accuracy"] == r["accuracy"] and len(saved["items"]) == 2
    png = (out / "accuracy_vs_tokens.png").read_bytes()
    assert png.startswith(b"\x89PNG") and r["png"].endswith("accuracy_vs_tokens.png")
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_sweep_matches_the_baselines_to_vtprune(tiny_llava_dir, capsys):
    r = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 2, "--sweep")
    assert list(r["runs"]) == ["full", "vtprune", "vtprune-stage1", "topk", "prumerge", "visionzip", "prumerge-iqr"]
    k = round(r["runs"]["vtprune"]["visual_tokens_mean"])
    assert r["matched_tokens"] == k
    for method in ("topk", "prumerge", "visionzip"):
        assert r["runs"][method]["visual_tokens_mean"] == k
    both, stage1 = r["runs"]["vtprune"], r["runs"]["vtprune-stage1"]
    assert both["prune"]["text"] and not stage1["prune"]["text"]
    assert stage1["visual_tokens_mean"] == both["visual_tokens_mean"]  # Stage 2 leaves Stage 1 alone
    assert stage1["cache_tokens_mean"] >= both["cache_tokens_mean"]  # without H2O the cache is never evicted


def test_stage1_only_runs_get_their_own_file(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    eval_json(capsys, "--model", tiny_llava_dir, "--limit", 2, "--out", out)
    eval_json(capsys, "--model", tiny_llava_dir, "--limit", 2, "--no-text-prune", "--out", out)
    assert sorted(p.name for p in out.glob("eval-*.json")) == ["eval-vtprune-test-stage1.json", "eval-vtprune-test.json"]


def test_bundle_eval_agrees_with_torch(tiny_llava_dir, tiny_bundle, tmp_path, capsys):
    torch_run = eval_json(capsys, "--model", tiny_llava_dir, "--limit", 5, "--out", tmp_path / "torch")
    onnx_run = eval_json(capsys, "--bundle", tiny_bundle, "--limit", 5, "--out", tmp_path / "onnx")
    for key in ("accuracy", "visual_tokens_mean", "visual_tokens_min", "visual_tokens_max", "total_tokens_mean"):
        assert onnx_run[key] == pytest.approx(torch_run[key]), key
    items = [json.loads(open(r["json"]).read())["items"] for r in (torch_run, onnx_run)]
    assert [i["prediction"] for i in items[0]] == [i["prediction"] for i in items[1]]


def test_errors_are_one_line(tiny_llava_dir, tiny_bundle, capsys):
    cases = [
        (["--model", tiny_llava_dir, "--method", "topk"], "--tokens"),
        (["--model", tiny_llava_dir, "--method", "topk", "--tokens", 65], "--tokens"),
        (["--model", tiny_llava_dir, "--method", "vtprune", "--tokens", 8], "--tokens"),
        (["--model", tiny_llava_dir, "--limit", 0], "--limit"),
        (["--model", tiny_llava_dir, "--prune-layer", 9], "--prune-layer"),
        (["--bundle", tiny_bundle, "--method", "visionzip", "--tokens", 8], "--method"),
        (["--bundle", tiny_bundle, "--model", tiny_llava_dir], "--bundle"),
    ]
    for argv, needle in cases:
        code = main(["eval", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2, argv
        lines = [line for line in err.splitlines() if line.startswith("vtprune: error:")]
        assert len(lines) == 1 and needle in lines[0], err


# ---------------------------------------------------------------- the figures, by hand


def rec(kind, prediction, answer, neg_type=None, visual=10, total=20) -> Record:
    return Record(kind, "q", answer, prediction, data.score(kind, prediction, answer), neg_type, visual, total, total)


def test_summary_on_hand_made_predictions():
    gold = "There are 2 objects. A small red circle at the top left, a large blue square at the centre."
    half = "There are 2 objects. A small red circle at the top left, a large green square at the centre."
    records = [
        rec("exist", "yes", "yes"),  # TP
        rec("exist", "Yes.", "yes"),  # TP (case, punctuation)
        rec("exist", "no", "yes"),  # FN
        rec("exist", "yes", "no", "popular"),  # FP
        rec("exist", "no", "no", "random"),  # TN
        rec("exist", "no", "no", "adversarial"),  # TN
        rec("count", "2", "2", visual=30, total=40),
        rec("count", "3", "2", visual=20, total=30),
        rec("colour", "red circle", "red"),  # first word counts
        rec("describe", gold, gold),  # F1 1
        rec("describe", half, gold),  # one of two tuples right: P = R = 1/2, F1 = 0.5
    ]
    s = summarise(records)
    assert s["n"] == 11
    assert s["by_kind"] == {"exist": pytest.approx(4 / 6), "count": 0.5, "colour": 1.0, "describe": pytest.approx(0.75)}
    assert s["accuracy"] == pytest.approx((4 + 1 + 1 + 1 + 0.5) / 11)
    p = s["exist_pope"]
    assert p["precision"] == pytest.approx(2 / 3) and p["recall"] == pytest.approx(2 / 3)
    assert p["f1"] == pytest.approx(2 / 3) and p["yes_ratio"] == pytest.approx(3 / 6)
    assert p["negatives_accuracy"] == {"random": 1.0, "popular": 0.0, "adversarial": 1.0}
    assert s["describe_exact_match"] == 0.5
    assert (s["visual_tokens_min"], s["visual_tokens_max"]) == (10, 30)
    assert s["visual_tokens_mean"] == pytest.approx((9 * 10 + 30 + 20) / 11)
    assert s["total_tokens_mean"] == pytest.approx((9 * 20 + 40 + 30) / 11)


def test_object_figures_by_hand():
    labels = np.zeros((24, 24), np.int64)
    labels[0, 0] = labels[0, 1] = 1  # object 1: patches 0 and 1
    labels[5, 5] = 2  # object 2: patch 125
    scores = np.full(576, 0.001)
    scores[[0, 1, 125]] = [0.2, 0.1, 0.05]
    f = object_figures(labels, [1, 7, 300], scores, 576)
    assert f["cls_on_objects"] == pytest.approx(0.35)
    assert f["object_recall"] == pytest.approx(1 / 3)  # one of the three object patches kept
    assert f["objects_seen"] == pytest.approx(1 / 2)  # object 1 seen, object 2 not
    assert f["object_share"] == pytest.approx(3 / 576)
    assert object_figures(labels, [1], None, 64) == {}  # another patch grid: nothing to say


# ---------------------------------------------------------------- baselines


def test_topk_and_visionzip_keep_exactly_k():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 576, generator=g)
    for k in (1, 10, 64, 128, 575, 576):
        kept = baselines.topk_selector(k)(scores)
        assert kept.shape == (1, k) and torch.equal(kept, kept.sort().values)
        assert set(kept[0].tolist()) == set(scores[0].argsort(descending=True)[:k].tolist())
        zipped = baselines.visionzip_selector(k)(scores)
        assert zipped.shape == (1, k) and len(set(zipped[0].tolist())) == k
        assert torch.equal(zipped, zipped.sort().values)
        dominant, contextual = baselines.visionzip_counts(k)
        top = set(scores[0].argsort(descending=True)[:dominant].tolist())
        assert top <= set(zipped[0].tolist())  # the dominant tokens are the highest scores


def test_visionzip_counts_follow_the_paper():
    assert [baselines.visionzip_counts(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def test_prumerge_iqr_rule_by_hand():
    # sorted: 1..9, 50, 100 (n = 11); linear quartiles at positions 2.5 and 7.5: Q1 = 3.5, Q3 = 8.5;
    # IQR = 5, upper fence = 8.5 + 7.5 = 16: the outliers are 50 and 100
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 9, 100, 50]])
    assert baselines.iqr_outlier_count(scores[0]) == 2
    assert baselines.prumerge_selector()(scores).tolist() == [[9, 10]]
    assert baselines.prumerge_selector(tokens=3)(scores).tolist() == [[8, 9, 10]]  # a fixed count overrides
    flat = torch.full((1, 16), 0.5)
    assert baselines.iqr_outlier_count(flat[0]) == 0
    assert baselines.prumerge_selector(k_min=1)(flat).shape == (1, 1)  # never an empty image


def test_prumerge_merge_by_hand():
    # n = 4 tokens, so each kept token absorbs all 3 others (32 neighbours, capped at n - 1)
    states = torch.tensor([[[1.0, 0], [0, 1], [2, 2], [3, -1]]])
    keys = torch.eye(4).unsqueeze(0)
    scores = torch.tensor([[0.4, 0.1, 0.2, 0.3]])
    kept = torch.tensor([[0, 3]])
    out = baselines.prumerge_merge(states, keys, scores, kept)
    x0 = torch.tensor([1.0, 0]) + 0.1 * torch.tensor([0.0, 1]) + 0.2 * torch.tensor([2.0, 2]) + 0.3 * torch.tensor([3.0, -1])
    x3 = torch.tensor([3.0, -1]) + 0.4 * torch.tensor([1.0, 0]) + 0.1 * torch.tensor([0.0, 1]) + 0.2 * torch.tensor([2.0, 2])
    assert torch.allclose(out[0], torch.stack([x0, x3]))


def test_visionzip_merge_by_hand():
    # n = 8, K = 7: 6 dominant + round(7 * 10 / 64) = 1 contextual target; the remaining token merges into it
    scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 1, 2]])  # dominant: tokens 0..5; rest in spatial order: 6, 7
    kept = baselines.visionzip_selector(7)(scores)
    assert kept.tolist() == [[0, 1, 2, 3, 4, 5, 6]]  # the target: the first of the rest (step 2)
    states = torch.arange(16, dtype=torch.float32).view(1, 8, 2)
    out = baselines.visionzip_merge(states, torch.randn(1, 8, 4), scores, kept)
    assert torch.equal(out[0, :6], states[0, :6])  # dominant tokens unchanged
    assert torch.equal(out[0, 6], states[0, 6] + states[0, 7])  # target + mean of its one assigned token


def test_visionzip_assigns_by_key_similarity():
    # n = 16, K = 13: 11 dominant (tokens 0..10) + round(13 * 10 / 64) = 2 contextual; the rest, in spatial
    # order, is 11..15, step 5 // 2 = 2: targets 11 and 13; tokens 12, 14, 15 merge into the most key-similar
    scores = torch.cat([torch.linspace(2, 1, 11), torch.full((5,), 0.1)]).unsqueeze(0)
    kept = baselines.visionzip_selector(13)(scores)
    assert kept.tolist() == [list(range(12)) + [13]]
    e0, e1 = torch.tensor([1.0, 0]), torch.tensor([0.0, 1])
    keys = torch.zeros(1, 16, 2)
    keys[0, 11], keys[0, 13], keys[0, 12], keys[0, 14], keys[0, 15] = e0, e1, e1, e0, e0 + 0.1 * e1
    states = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    out = baselines.visionzip_merge(states, keys, scores, kept)
    s = states[0]
    assert torch.allclose(out[0, 11], s[11] + (s[14] + s[15]) / 2)  # target 11 took 14 and 15
    assert torch.allclose(out[0, 12], s[13] + s[12])  # target 13 (12th kept token) took 12
    assert torch.equal(out[0, :11], s[:11])


def test_encode_image_hook_is_backwards_compatible(tiny_llava_dir):
    from vtprune.models.loading import load_llava
    from vtprune.models.reference import PrunedLlava

    model = PrunedLlava(load_llava(tiny_llava_dir))
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    plain = model.encode_image(pixels, baselines.topk_selector(9))
    assert plain.embeds.shape[1] == 9
    same = model.encode_image(pixels, baselines.prumerge_selector(9), None)
    assert torch.equal(plain.embeds, same.embeds) and torch.equal(plain.kept_index, same.kept_index)
    merged = model.encode_image(pixels, baselines.prumerge_selector(9), baselines.prumerge_merge)
    assert torch.equal(merged.kept_index, plain.kept_index)
    assert not torch.allclose(merged.embeds, plain.embeds)  # the merge reaches the features
    zipped = model.encode_image(pixels, baselines.visionzip_selector(9), baselines.visionzip_merge)
    assert zipped.embeds.shape == plain.embeds.shape
