"""The two pruning stages on hand-made inputs: Stage-1 split, Stage-2 prefill selection, H2O eviction."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.models.pruning import (
    evict,
    keep_heavy_recent,
    prefill_importance,
    prefill_select,
    select_topk,
    select_visual_tokens,
    soft_keep_mask,
    split_point,
)


def brute_force_split(d: list[float]) -> int:
    n = len(d)
    if d[0] == d[-1]:
        return n
    best, best_i = -1.0, None
    for i in range(1, n):  # 1-based i in [1, n-1]
        f = (n - i) * (d[0] - d[i - 1]) / (d[0] - d[-1])
        if f > best:
            best, best_i = f, i
    return best_i


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=2, max_size=64))
def test_split_point_is_the_brute_force_argmax(values):
    d = sorted(values, reverse=True)
    assert int(split_point(torch.tensor([d], dtype=torch.float64))[0]) == brute_force_split(d)


def test_flat_curve_keeps_all():
    assert int(split_point(torch.full((1, 576), 1 / 576))[0]) == 576
    assert select_visual_tokens(torch.full((1, 10), 0.1)).shape[1] == 10


def test_steeper_tail_keeps_fewer():
    n = 576
    x = torch.arange(n, dtype=torch.float64)
    kept = [int(split_point(torch.exp(-x / tau).unsqueeze(0))[0]) for tau in (200.0, 50.0, 10.0, 2.0)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1], kept


def test_kept_tokens_are_the_top_scores_in_spatial_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 100, generator=g) ** 8  # long tail
    kept = select_visual_tokens(scores)
    k = kept.shape[1]
    assert torch.all(kept[0, 1:] > kept[0, :-1])  # ascending = spatial order
    assert set(kept[0].tolist()) == set(torch.topk(scores[0], k).indices.tolist())
    assert k == int(split_point(scores.sort(descending=True).values)[0])


def test_k_respects_its_clamp():
    scores = torch.zeros(1, 50)
    scores[0, 7] = 1.0  # one spike: i* = 2 on this curve, so k_min decides
    assert select_visual_tokens(scores, k_min=1).shape[1] == int(split_point(scores.sort(descending=True).values)[0])
    assert select_visual_tokens(scores, k_min=20).shape[1] == 20
    assert select_visual_tokens(scores, k_min=500).shape[1] == 50


def test_topk_baseline_keeps_exactly_k():
    scores = torch.rand(2, 30)
    kept = select_topk(scores, 7)
    assert kept.shape == (2, 7) and torch.all(kept.diff(dim=-1) > 0)


def test_soft_mask_is_half_at_the_split_and_monotone():
    scores = torch.rand(1, 64) ** 6
    mask = soft_keep_mask(scores, alpha=0.075)
    d = scores.sort(descending=True).values
    i_star = int(split_point(d)[0])
    at_split = (scores == d[0, i_star - 1]).nonzero()[0, 1]
    assert abs(float(mask[0, at_split]) - 0.5) < 1e-6
    order = scores[0].argsort()
    assert torch.all(mask[0, order].diff() >= 0)


def test_soft_keep_mask_masks_the_long_tail():
    # a long-tailed curve: one peak, a head of 19 more, then a tail decaying from 2e-4 to 1e-5
    curve = torch.cat([torch.tensor([0.3]), torch.full((19,), 0.02), torch.linspace(2e-4, 1e-5, 556)])
    scores = curve[torch.randperm(576, generator=torch.Generator().manual_seed(0))][None]
    mask = soft_keep_mask(scores, alpha=0.075)
    hard = select_visual_tokens(scores)[0]
    assert float(mask[0, hard].min()) >= 0.5 - 1e-6  # the hard keep-set is kept
    i_star = len(hard)
    threshold = float(curve[i_star - 1])
    deep = scores[0] <= threshold / 3
    assert int(deep.sum()) > 150
    assert float(mask[0, deep].max()) < 1e-3  # and the tail is masked, as the hard split masks it


# ---------------------------------------------------------------- Stage 2
def test_keep_heavy_recent_hand_made():
    score = torch.tensor([[3.0, 1.0, 2.0, 5.0, 0.0, 0.0]])
    assert keep_heavy_recent(score, heavy=2, recent=2).tolist() == [[0, 3, 4, 5]]
    assert keep_heavy_recent(score, heavy=0, recent=3).tolist() == [[3, 4, 5]]
    assert keep_heavy_recent(score, heavy=3, recent=0).tolist() == [[0, 2, 3]]
    assert keep_heavy_recent(score, heavy=4, recent=4).tolist() == [[0, 1, 2, 3, 4, 5]]
    # ties: the earlier position wins
    assert keep_heavy_recent(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), heavy=1, recent=1).tolist() == [[0, 3]]


def test_prefill_importance_is_causal_column_sums():
    e = torch.randn(1, 5, 8)
    imp = prefill_importance(e)
    sim = (e[0] @ e[0].T) / 8**0.5
    probs = torch.zeros(5, 5)
    for i in range(5):
        probs[i, : i + 1] = torch.softmax(sim[i, : i + 1], dim=0)
    assert torch.allclose(imp[0], probs.sum(0), atol=1e-6)
    assert abs(float(imp.sum()) - 5.0) < 1e-5  # each row of a softmax sums to one


def test_prefill_select_keeps_recent_and_heaviest():
    e = torch.randn(1, 12, 16)
    idx = prefill_select(e, heavy=3, recent=4)
    assert idx.shape == (1, 7)
    assert idx[0, -4:].tolist() == [8, 9, 10, 11]
    imp = prefill_importance(e)[0, :8]
    assert set(idx[0, :3].tolist()) == set(imp.topk(3).indices.tolist())
    assert prefill_select(e, heavy=6, recent=6).shape == (1, 12)  # 0.5 / 0.5: nothing dropped


def _cache(B, H, P, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, P, D, generator=g), torch.randn(B, H, P, D, generator=g), torch.rand(B, H, P, generator=g))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.integers(0, 10), st.integers(0, 10), st.integers(0, 99))
def test_eviction_properties(B, H, P, heavy, recent, seed):
    if heavy + recent == 0:
        return
    k, v, s = _cache(B, H, P, 4, seed)
    k2, v2, s2, *_ = evict(k, v, s, heavy, recent)
    assert k2.shape[2] == v2.shape[2] == s2.shape[2] == min(P, heavy + recent)  # never above budget
    for b in range(B):
        for h in range(H):
            rows = [int((k[b, h] == row).all(-1).nonzero()[0]) for row in k2[b, h]]  # where each kept key came from
            assert rows == sorted(rows)  # original order
            if P > heavy + recent:
                assert rows[len(rows) - recent :] == list(range(P - recent, P))  # the recent newest always kept
                older = s[b, h, : P - recent]
                assert set(rows[: len(rows) - recent]) == set(older.topk(heavy).indices.tolist())  # the heavy set
            assert torch.equal(s2[b, h], s[b, h, rows]) and torch.equal(v2[b, h], v[b, h, rows])


def test_scores_accumulate_across_decode_steps(tiny_llava_dir):
    """In the reference model, a cached position's score only grows, by the attention it receives each step."""
    from vtprune.models.config import PruneConfig
    from vtprune.models.loading import load_llava
    from vtprune.models.reference import PrunedLlava

    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(visual=False, heavy_budget=100, recent_budget=100))
    _, cache, _ = model.prefill(torch.randn(1, 6, 32))
    Hq = model.config.text_config.num_attention_heads
    Hkv = model.config.text_config.num_key_value_heads
    before = cache.scores[0].clone()  # [1, Hkv, 6]
    assert torch.allclose(before.sum(), torch.tensor(6.0 * Hq))  # every query row's probabilities sum to 1
    model.decode_step(torch.tensor([[5]]), cache)
    after = cache.scores[0]  # [1, Hkv, 7]
    gain = after[..., :6] - before
    assert torch.all(gain >= 0)
    assert torch.allclose(gain.sum() + after[..., 6].sum(), torch.tensor(float(Hq)))  # one new query per head
    assert Hkv == after.shape[1]


@pytest.mark.parametrize("policy,runs", [("h2o", 5), ("snapkv", 9)])
def test_decode_cache_never_exceeds_budget(tiny_llava_dir, policy, runs):
    """h2o selects 5 of the 9 prompt tokens before the first layer; snapkv runs all 9 and cuts the cache to 5."""
    from vtprune.models.config import PruneConfig
    from vtprune.models.loading import load_llava
    from vtprune.models.reference import PrunedLlava

    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(visual=False, heavy_budget=3, recent_budget=2, policy=policy))
    logits, cache, positions = model.prefill(torch.randn(1, 9, 32))
    assert positions.shape[1] == runs and cache.length == 5  # the prompt cut to the budget
    assert cache.next_position == 9  # positions continue from the unpruned length
    for _ in range(20):
        logits = model.decode_step(logits[:, -1].argmax(-1, keepdim=True), cache)
        assert all(k.shape[2] <= 5 for k in cache.keys)
    assert cache.next_position == 29
