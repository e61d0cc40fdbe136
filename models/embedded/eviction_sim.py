"""Stage 2's decode-time eviction replayed on a teacher-forced sequence, for fine-tuning.

At inference the answer is generated one token at a time and each layer's KV cache is held at
heavy + recent positions (H2O, `pruning.evict`): a long answer loses most of the visual tokens the
prompt had before its last words are written. Training on whole sequences in one pass never shows the
model that. This module makes the training forward see what the decode would: for every answer token
(a decode query) it computes, per layer and KV head, the keys the cache holds at that step, and masks
the rest.

The replay is exact, not an approximation: a layer's eviction depends only on that layer's attention
probabilities of earlier queries, which the teacher-forced pass computes from the same (already
evicted) lower layers. So, within a layer, walking the answer positions in order with the cache as a
key mask reproduces `reference.PrunedLlava.decode_step` (a test holds it to the reference's logits).
The keep decisions pass no gradient; the model learns to answer from what H2O keeps, and to keep
(by attending to them) the tokens it will need. Two policies replay: `h2o` and `snapkv` (whose prompt scores
come from the observation window, the last `snap_window` prompt queries; the keep rule is h2o's). Stage 2's prefill drop (when heavy + recent < L) is not
replayed: with the paper's 0.5/0.5 budgets, rounded half up, it never happens.

Use: `transformers.AttentionInterface` has the function under `NAME`; set the language model's
attention implementation to it and pass `stage2=Plan(...)` to its forward (transformers hands the
keyword to every attention call). Without `stage2` it is eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

from vtprune.models.config import PruneConfig

NAME = "vtprune_stage2_replay"


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Additive mask [B, 1, S, S] -> [B, S, S] bool: the keys each query may see before eviction.
    Masked keys hold `train.NEG` (-1e9); soft Stage 1's log m biases (>= -1e4) stay visible."""
    return mask[:, 0] > -1e8


@dataclass
class Plan:
    """The decode spans of a batch: span r is row `row[r]`, answer positions start[r] .. start[r] + length[r] - 1,
    with that prompt's budgets (heavy[r], recent[r]). All [R] int64."""

    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    heavy: torch.Tensor
    recent: torch.Tensor
    window: int | None = None  # snapkv: the prompt's scores come from its last `window` queries (None: all, h2o)

    @classmethod
    def from_batch(cls, targets: torch.Tensor, mask: torch.Tensor, dropped: torch.Tensor | None = None,
                   prune: PruneConfig | None = None) -> "Plan":  # fmt: skip
        """targets [B, S] next-token targets (-100: none); mask [B, 1, S, S] the additive attention mask
        before eviction (`train.turn_mask`, soft Stage 1's biases added); dropped [B] how many of a row's visible image tokens
        inference's Stage 1 would not have kept (soft-mask steps keep a few extra, with tiny weights),
        so that the budgets come from the prompt length inference has.

        A decode query is a token that some target predicts (an answer token); the prompt of its span is
        what the position before the span sees."""
        prune = prune or PruneConfig()
        if prune.policy not in ("h2o", "snapkv"):
            raise ValueError(f"the replay implements h2o's keep rule (h2o, snapkv), not {prune.policy!r}")
        visible = allowed(mask)
        decode = torch.zeros_like(targets, dtype=torch.bool)
        decode[:, 1:] = targets[:, :-1] != -100
        dropped = dropped if dropped is not None else torch.zeros(targets.shape[0], dtype=torch.long)
        rows, starts, lengths, heavies, recents = [], [], [], [], []
        for b in range(targets.shape[0]):
            d = decode[b].tolist()
            i = 0
            while i < len(d):
                if not d[i]:
                    i += 1
                    continue
                j = i
                while j < len(d) and d[j]:
                    j += 1
                prompt_len = int(visible[b, i - 1].sum()) - int(dropped[b])
                heavy, recent = prune.budgets(prompt_len)
                rows.append(b), starts.append(i), lengths.append(j - i), heavies.append(heavy), recents.append(recent)
                i = j
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        window = prune.snap_window if prune.policy == "snapkv" else None
        return cls(t(rows), t(starts), t(lengths), t(heavies), t(recents), window)


@torch.no_grad()
def replay(scores: torch.Tensor, visible: torch.Tensor, plan: Plan, groups: int) -> torch.Tensor:
    """Which keys each query sees once the cache is evicted.

    scores [B, Hq, S, S]: one layer's attention logits (scaled q.k plus the additive mask);
    visible [B, S, S] bool: the keys before eviction -> seen [B, Hkv, S, S] bool, equal to `visible`
    except on the decode queries of `plan`.

    Per span: the cache starts as the prompt (every key the last prompt token sees) with the attention
    each key received from the prompt's queries (snapkv: its last `plan.window` queries); each answer token
    sees the cache and itself, adds its attention to the scores, and the cache keeps its `recent` newest plus
    its `heavy` best-scored others
    (`pruning.keep_heavy_recent`: ties to the lower position) whenever it exceeds heavy + recent, at the
    prompt's end too: under a budget below the prompt that is snapkv's prefill cut, exactly; h2o's selection
    on the embeddings before the first layer (`pruning.prefill_select`) is not replayed."""
    B, Hq, S, _ = scores.shape
    Hkv = Hq // groups
    seen = visible[:, None].expand(B, Hkv, S, S).clone()
    if len(plan.row) == 0:
        return seen
    probs = torch.softmax(scores.float(), dim=-1)  # the attention without eviction: right for prompt queries
    R = len(plan.row)
    b, p0 = plan.row, plan.start
    cache = visible[b, p0 - 1][:, None].expand(R, Hkv, S).clone()  # [R, Hkv, S]
    score = torch.zeros(R, Hkv, S)
    queries = cache[:, 0]  # [R, S] the prompt's queries (they are its keys)
    if plan.window is not None:  # snapkv's observation window: the last `window` of them
        queries = queries & (queries.flip(-1).cumsum(-1).flip(-1) <= plan.window)
    for row in b.unique().tolist():  # attention received from those queries
        r = (b == row).nonzero().flatten()
        received = torch.einsum("hqk,nq->nhk", probs[row], queries[r].float())  # [n, Hq, S]
        score[r] = received.view(len(r), Hkv, groups, S).sum(2)
    cache = _keep(cache, score, plan.heavy, plan.recent)  # a budget below the prompt: cut at its end (snapkv's)
    slots = torch.arange(S)
    for j in range(int(plan.length.max())):
        active = j < plan.length  # [R]
        p = (p0 + j).clamp(max=S - 1)
        vis = cache | (slots == p[:, None])[:, None, :]  # [R, Hkv, S]
        logit = scores[b, :, p].float().masked_fill(~vis.repeat_interleave(groups, 1), float("-inf"))  # [R, Hq, S]
        score = score + torch.softmax(logit, -1).view(R, Hkv, groups, S).sum(2)
        r = active.nonzero().flatten()
        seen[b[r], :, p[r]] = vis[r]
        cache = torch.where(active[:, None, None], _keep(vis, score, plan.heavy, plan.recent), cache)
    return seen


def _keep(members: torch.Tensor, score: torch.Tensor, heavy: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """H2O's keep rule on a cache given as a mask: members [R, Hkv, S] bool, score [R, Hkv, S], heavy/recent [R]
    -> the members left when there are more than heavy + recent: the `recent` newest, then the `heavy`
    best-scored older ones (ties to the lower position, as `pruning.keep_heavy_recent`)."""
    slots = torch.arange(members.shape[-1])
    newer = members.flip(-1).cumsum(-1).flip(-1)  # members at or after each slot
    recent_m = members & (newer <= recent[:, None, None])
    older = members & ~recent_m
    order = torch.argsort(torch.where(older, score, float("-inf")), dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, slots.expand_as(order))
    heavy_m = older & (rank < heavy[:, None, None])
    over = (members.sum(-1) > (heavy + recent)[:, None])[..., None]  # [R, Hkv, 1]
    return torch.where(over, recent_m | heavy_m, members)


def attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
              stage2: Plan | None = None, **kwargs):  # fmt: skip
    """Eager attention (as `transformers`' own), with the cache's evicted keys masked on decode queries."""
    groups = module.num_key_value_groups
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling  # [B, Hq, S, S]
    if attention_mask is not None:
        w = w + attention_mask
    if stage2 is not None:
        seen = replay(w.detach(), allowed(attention_mask), stage2, groups)  # [B, Hkv, S, S]
        w = w.masked_fill(~seen.repeat_interleave(groups, 1), -1e9)
    probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, attention)
