"""The paper's two pruning stages as pure functions on tensors.

Stage 1 (dynamic visual pruning, paper Eq. 1-3): sort the CLS-to-patch attention, find the long-tail
split point i*, keep the i* best patches in spatial order.
Stage 2 (visual-text interactive pruning, H2O): keep the `recent` newest tokens plus the `heavy` ones with
the highest accumulated attention, at prefill (from the causal similarity of the embeddings) and at
every decode step (the KV-cache eviction, mirrored by the ONNX function `ai.vtprune::KVEvict`).
What the decode-time eviction ranks by is a policy (`POLICIES`, `keep_index`): the paper's H2O, TOVA,
a SnapKV-style observation window, or H2O with a floor of image tokens; `reference.py` keeps each
policy's scores, this module picks what stays.

Ties are broken towards the lower position everywhere (stable sorts), so that the PyTorch reference,
the NumPy reference and the ONNX graphs pick the same tokens.
"""

from __future__ import annotations

import math

import torch

from vtprune.models.config import POLICIES, floor_slots  # noqa: F401  (floor_slots: callers take it from here)


def split_point(sorted_desc: torch.Tensor) -> torch.Tensor:
    """i* = argmax_{i in [1, n-1]} (n - i)(d_1 - d_i) / (d_1 - d_n) for each row (paper Eq. 3).

    `sorted_desc` [..., n] holds each curve in descending order. Returns i* [...] (int64, 1-based, so it
    is also the number of head tokens). A flat curve (d_1 == d_n) has no tail: it returns n.
    """
    n = sorted_desc.shape[-1]
    d1 = sorted_desc[..., :1]  # [..., 1]
    dn = sorted_desc[..., -1:]  # [..., 1]
    c = d1 - dn
    i = torch.arange(1, n, device=sorted_desc.device, dtype=sorted_desc.dtype)  # [n-1] = 1..n-1
    f = (n - i) * (d1 - sorted_desc[..., : n - 1]) / torch.where(c > 0, c, torch.ones_like(c))  # [..., n-1]
    i_star = torch.argmax(f, dim=-1) + 1  # first maximum, like ONNX ArgMax
    return torch.where(c[..., 0] > 0, i_star, torch.full_like(i_star, n))


def cls_attention_scores(layer, hidden: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention probabilities of one CLIP encoder layer, averaged over heads (paper Eq. 1).

    These are the probabilities the layer itself computes (softmax over CLS + n keys) for the CLS
    query, with the CLS key's column dropped. hidden: [B, 1+n, D] (the layer's input) -> [B, n].
    """
    attn = layer.self_attn
    B, T, _ = hidden.shape
    h = layer.layer_norm1(hidden)
    q = attn.q_proj(h[:, :1]).view(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, nh, 1, hd]
    k = attn.k_proj(h).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, nh, T, hd]
    probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32)  # [B, nh, 1, T]
    return probs[:, :, 0, 1:].mean(dim=1).to(hidden.dtype)  # [B, n]


def select_visual_tokens(scores: torch.Tensor, k_min: int = 1) -> torch.Tensor:
    """Stage 1 keep-set of one image: the k = clamp(i*, k_min, n) highest scores, in spatial order.

    scores [1, n] -> kept_index [1, k] (int64, ascending). One k per image: batches of several images
    are refused, since their k differ (the runtime and the graphs make the same choice).
    """
    if scores.shape[0] != 1:
        raise ValueError(f"Stage 1 takes one image at a time (k differs per image); got a batch of {scores.shape[0]}")
    n = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # [1, n]
    k = int(split_point(torch.gather(scores, -1, order))[0].clamp(min=min(k_min, n), max=n))
    return torch.sort(order[:, :k], dim=-1).values  # [1, k]


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Fixed-k baseline on the same CLS scores (the paper's Table 1): [B, n] -> [B, k], spatial order."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.sort(order[:, : min(k, scores.shape[-1])], dim=-1).values


def soft_keep_mask(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Differentiable keep-mask for pruning-aware fine-tuning: sigmoid((d_j - d_{i*}) / (alpha d_{i*})).

    This project's reading of the paper's smoothing coefficient alpha (design.md): a temperature
    relative to the score at the split point, so that tokens within a few alpha of the split pass
    gradient while the long tail is masked as the hard split masks it. (Relative to the curve's
    range d_1 - d_n, as first written, the temperature dwarfs the gap at the split on the long-tailed
    curves the method is for, and the tail kept m ~ 0.4.)
    scores [B, n] -> mask [B, n] in (0, 1), 0.5 at the split point.
    """
    sorted_desc = torch.sort(scores, dim=-1, descending=True).values  # [B, n]
    i_star = split_point(sorted_desc)  # [B]
    threshold = torch.gather(sorted_desc, -1, (i_star - 1).unsqueeze(-1))  # [B, 1]
    return torch.sigmoid((scores - threshold) / (alpha * threshold.abs().clamp_min(1e-12)))


def keep_heavy_recent(score: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """H2O keep-set along the last axis: the `recent` last positions plus the `heavy` best-scored others.

    score [..., P] -> index [..., min(P, heavy + recent)] (int64, ascending). When the budget covers
    everything, every position is kept.
    """
    P = score.shape[-1]
    if heavy + recent >= P:
        return torch.arange(P, device=score.device).expand(*score.shape[:-1], P)
    older = P - recent
    order = torch.argsort(score[..., :older], dim=-1, descending=True, stable=True)  # [..., older]
    heavy_idx = torch.sort(order[..., :heavy], dim=-1).values  # [..., heavy]
    recent_idx = torch.arange(older, P, device=score.device).expand(*score.shape[:-1], recent)  # [..., recent]
    return torch.cat([heavy_idx, recent_idx], dim=-1)


def keep_index(score: torch.Tensor, heavy: int, recent: int, policy: str = "h2o", visual: torch.Tensor | None = None,
               floor: int = 0) -> torch.Tensor:  # fmt: skip
    """The keep-set of `policy` along the last axis: score [..., P] (visual [..., P] bool for `vfloor`: which
    entries are image tokens) -> index [..., min(P, heavy + recent)] (int64, ascending); ties to the lower position.

    The policies (config.POLICIES), all at the same cache budget heavy + recent:
    - `h2o` (the paper's): score = attention received from every query so far; keep the `recent` newest plus
      the `heavy` best-scored older positions;
    - `tova` (Oren et al. 2024): score = attention received from the newest query only; keep the
      heavy + recent best-scored positions, no recent window;
    - `snapkv` (Li et al. 2024, at equal budgets): a prompt token's score is the attention it received from
      the last `snap_window` prompt tokens (the observation window) instead of from the whole prompt; each
      decode step then adds its attention as under h2o, and the keep rule is h2o's. The prompt is not cut on
      its embeddings (`prefill_select`) but after it has run, by those window scores;
    - `vfloor`: h2o's scores, with round(visual_floor * budget) slots reserved for the image tokens Stage 1
      kept: the recent window shrinks to min(recent, budget - floor), the floor's best-scored image tokens
      older than it are kept first, and the rest of the budget follows h2o.
    """
    if policy in ("h2o", "snapkv"):
        return keep_heavy_recent(score, heavy, recent)
    if policy == "tova":
        return keep_heavy_recent(score, heavy + recent, 0)
    if policy != "vfloor":
        raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
    P = score.shape[-1]
    budget = heavy + recent
    if budget >= P:
        return torch.arange(P, device=score.device).expand(*score.shape[:-1], P)
    if visual is None:
        visual = torch.zeros_like(score, dtype=torch.bool)
    r = min(recent, budget - min(floor, budget))  # the recent window gives way to the floor
    older = P - r
    s, vis = score[..., :older], visual[..., :older]  # [..., older]
    f = vis.sum(-1, keepdim=True).clamp(max=min(floor, budget))  # [..., 1] floor slots this row can fill
    picked = vis & (_stable_rank(torch.where(vis, s, float("-inf"))) < f)  # the best image tokens
    rest = (~picked) & (_stable_rank(torch.where(picked, float("-inf"), s)) < budget - r - f)  # then h2o
    heavy_idx = torch.argsort((~(picked | rest)).to(torch.int8), dim=-1, stable=True)[..., : budget - r]  # ascending
    recent_idx = torch.arange(older, P, device=score.device).expand(*score.shape[:-1], r)
    return torch.cat([heavy_idx, recent_idx], dim=-1)


def _stable_rank(score: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based rank in a stable descending sort along the last axis (ties: lower position first)."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))


def prefill_importance(embeds: torch.Tensor) -> torch.Tensor:
    """Stage-2 importance at prefill (the paper's Fig. 5): attention each token receives from itself and
    later tokens in softmax(E E^T / sqrt(d)) under a causal mask, computed on the LLM's input embeddings.

    embeds [B, L, D] -> importance [B, L].
    """
    L, D = embeds.shape[-2:]
    sim = (embeds.float() @ embeds.float().transpose(-1, -2)) / math.sqrt(D)  # [B, L, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=embeds.device).tril()
    sim = sim.masked_fill(~causal, float("-inf"))
    return torch.softmax(sim, dim=-1).sum(dim=-2)  # column sums: [B, L]


def prefill_select(embeds: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Stage-2 prefill keep-set: embeds [B, L, D] -> index [B, min(L, heavy + recent)], ascending."""
    return keep_heavy_recent(prefill_importance(embeds), heavy, recent)


def evict(key: torch.Tensor, value: torch.Tensor, score: torch.Tensor, heavy: int, recent: int,
          positions: torch.Tensor | None = None, policy: str = "h2o", visual: torch.Tensor | None = None,
          floor: int = 0):  # fmt: skip
    """Cap one layer's KV cache at heavy + recent positions, per batch row and KV head.

    key/value [B, H, P, Dh], score [B, H, P] (the policy's score), optionally positions [B, H, P] (the
    position id of each cached entry, for reports) and visual [B, H, P] bool (image tokens, for `vfloor`)
    -> (key, value, score, positions, visual), None where not given, with P reduced to
    min(P, heavy + recent). Kept positions stay in their original order.
    """
    P = score.shape[-1]
    if heavy + recent >= P:
        return key, value, score, positions, visual
    idx = keep_index(score, heavy, recent, policy, visual, floor)  # [B, H, K]
    gather_kv = idx.unsqueeze(-1).expand(*idx.shape, key.shape[-1])  # [B, H, K, Dh]
    kept = positions.gather(2, idx) if positions is not None else None
    kept_visual = visual.gather(2, idx) if visual is not None else None
    return key.gather(2, gather_kv), value.gather(2, gather_kv), score.gather(2, idx), kept, kept_visual
