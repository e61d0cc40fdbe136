"""Stage-1 alternatives at matched token counts: the baselines `vtprune eval` compares the long-tail split with.

Each is a selector (CLS scores [1, n] -> kept patch indices [1, k], ascending), optionally with a merger that
folds the pruned tokens into the kept ones (`PrunedLlava.encode_image(pixels, selector, merge)`):

- **TopK** (the paper's Table 1): the K highest scores of the same CLS attention vtprune splits; no merging.
- **PruMerge** (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
  arXiv:2403.15388): adaptive k = the number of IQR outliers of the CLS attention (scores above
  Q3 + 1.5 IQR), keep those; then each kept token absorbs its 32 nearest tokens by key cosine similarity,
  weighted by their CLS attention: x_i + sum_j a_j x_j (the authors' code does not normalise the weights).
  With `tokens=K` the count is fixed instead (top K), to compare at a matched token count.
- **VisionZip** (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
  arXiv:2412.04467): K = dominant + contextual tokens, split as the paper's settings (54 + 10 of 64,
  108 + 20 of 128, 162 + 30 of 192: contextual = round(10 K / 64)). Dominant = the highest CLS attention;
  of the rest (in spatial order), every step-th token is a contextual target, and each remaining token is
  assigned to its most key-similar target; a contextual token is target + mean of its assigned tokens.

Where they apply, and what is simplified:
- The papers select on the vision tower's last layers (the feature layer, after the whole ViT has run on all
  576 tokens). Here they act where vtprune's Stage 1 does: the scores, keys and states of layer `prune_layer`
  (default 3), and the later layers run on CLS + K, so the comparison isolates the selection/merge rule at equal
  vision compute. `--prune-layer` set to the feature layer's depth (5 for the embedded model: 6 layers, feature
  layer -2) places them as their papers do: no layer runs after the selection.
- Kept tokens stay in spatial order for every method (PruMerge orders them by score, VisionZip puts the
  contextual tokens after the dominant ones); a VisionZip contextual token sits at its target's position.
- Keys are the layer's key projections concatenated over heads (PruMerge's metric; VisionZip averages them
  over heads). PruMerge's optional extra token (the attention-weighted sum of all pruned tokens) is left out,
  so that every method hands exactly k tokens to the LLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.models.pruning import select_topk
from vtprune.models.reference import Merger, Selector

PRUMERGE_NEIGHBOURS = 32  # tokens each kept token absorbs (PruMerge's code: topk(cos_sim, k=32))
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64  # the paper's 64-token setting: 54 dominant + 10 contextual


def keep_all(n: int) -> Selector:
    """Every patch, in order: Stage 1 scores are still computed (for reporting) but nothing is pruned."""
    return lambda scores: torch.arange(n, device=scores.device).unsqueeze(0)  # [1, n]


def topk_selector(k: int) -> Selector:
    """The K highest CLS scores, in spatial order (the paper's fixed-k baseline, Table 1)."""
    return lambda scores: select_topk(scores, k)


# ---------------------------------------------------------------- PruMerge


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """PruMerge's adaptive token count: how many scores lie above Q3 + 1.5 (Q3 - Q1).

    scores [n] (one image). Quartiles interpolate linearly, as `numpy.percentile` does in the authors' code.
    """
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return int((scores.double() > q3 + 1.5 * (q3 - q1)).sum())


def prumerge_selector(tokens: int | None = None, k_min: int = 1) -> Selector:
    """Top max(IQR outliers, k_min) CLS scores, or the top `tokens` when a count is given."""

    def select(scores: torch.Tensor) -> torch.Tensor:
        k = tokens if tokens is not None else max(iqr_outlier_count(scores[0]), k_min)
        return select_topk(scores, k)

    return select


def prumerge_merge(states: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Each kept token plus the CLS-attention-weighted sum of its most key-similar other tokens.

    states [1, n, D], keys [1, n, Dk], scores [1, n], kept [1, k] -> [1, k, D]. The neighbours of token i are
    the min(32, n - 1) tokens j != i (kept or pruned) with the highest cosine similarity of keys.
    """
    n = states.shape[1]
    idx = kept[0]  # [k]
    unit = F.normalize(keys[0].float(), dim=-1)  # [n, Dk]
    sim = unit[idx] @ unit.T  # [k, n]
    sim[torch.arange(len(idx)), idx] = float("-inf")  # not itself
    m = min(PRUMERGE_NEIGHBOURS, n - 1)
    near = sim.topk(m, dim=-1).indices  # [k, m]
    weights = scores[0][near].unsqueeze(-1).to(states.dtype)  # [k, m, 1]
    merged = states[0][idx] + (weights * states[0][near]).sum(dim=1)  # [k, D]
    return merged.unsqueeze(0)


# ---------------------------------------------------------------- VisionZip


def visionzip_counts(k: int) -> tuple[int, int]:
    """(dominant, contextual) for K tokens, in the paper's proportion (54 + 10 of 64)."""
    contextual = int(round(k * VISIONZIP_CONTEXTUAL_SHARE))
    return k - contextual, contextual


def visionzip_parts(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dominant [d], contextual targets [c], tokens merged into them [n - d - c]) patch indices of one image.

    scores [n]. Dominant: the d highest scores (ties to the lower index). Targets: every step-th of the
    remaining tokens in spatial order, step = (n - d) // c, as VisionZip picks them.
    """
    n = scores.shape[0]
    dominant_n, contextual_n = visionzip_counts(min(k, n))
    order = torch.argsort(scores, descending=True, stable=True)  # [n]
    dominant = order[:dominant_n]
    rest = torch.sort(order[dominant_n:]).values  # [n - d], spatial order
    if contextual_n == 0:
        return dominant, rest[:0], rest
    step = max(1, len(rest) // contextual_n)
    pick = torch.zeros(len(rest), dtype=torch.bool)
    pick[torch.arange(0, len(rest), step)[:contextual_n]] = True
    return dominant, rest[pick], rest[~pick]


def visionzip_selector(tokens: int) -> Selector:
    """Dominant + contextual target positions, K in all, in spatial order."""

    def select(scores: torch.Tensor) -> torch.Tensor:
        dominant, targets, _ = visionzip_parts(scores[0], tokens)
        return torch.sort(torch.cat([dominant, targets])).values.unsqueeze(0)  # [1, K]

    return select


def visionzip_merge(states: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Dominant tokens as they are; each contextual target plus the mean of the tokens assigned to it.

    states [1, n, D], keys [1, n, Dk], scores [1, n], kept [1, K] (from `visionzip_selector`) -> [1, K, D].
    """
    dominant, targets, others = visionzip_parts(scores[0], kept.shape[1])
    out = states[0][kept[0]].clone()  # [K, D]
    if len(targets) == 0 or len(others) == 0:
        return out.unsqueeze(0)
    unit = F.normalize(keys[0].float(), dim=-1)  # [n, Dk]
    assign = F.one_hot((unit[others] @ unit[targets].T).argmax(dim=-1), len(targets)).to(states.dtype)  # [r, c]
    counts = assign.sum(dim=0).clamp(min=1).unsqueeze(-1)  # [c, 1]
    contextual = states[0][targets] + assign.T @ states[0][others] / counts  # [c, D]
    out[torch.searchsorted(kept[0], targets)] = contextual
    return out.unsqueeze(0)


# ---------------------------------------------------------------- by name


def stage1(method: str, n: int, tokens: int | None, k_min: int = 1) -> tuple[Selector | None, Merger | None]:
    """(selector, merger) of an evaluation method; (None, None) is vtprune's own split (the model's PruneConfig)."""
    if method == "full":
        return keep_all(n), None
    if method == "vtprune":
        return None, None
    if method == "topk":
        return topk_selector(tokens), None
    if method == "prumerge":
        return prumerge_selector(tokens, k_min), prumerge_merge
    if method == "visionzip":
        return visionzip_selector(tokens), visionzip_merge
    raise ValueError(f"unknown Stage-1 method {method!r}; expected full, vtprune, topk, prumerge or visionzip")
