"""The KV cache with attention scores: one small explicit object, per layer (key, value, score).

positions[b, h, p] is the position id of that entry (which token it is: eviction differs per head).
score[b, h, p] is what the eviction policy ranks entry p by (summed over the query heads of KV head h):
under H2O the attention it has received from every query so far (prefill and each decode step), under
TOVA from the newest query only, under SnapKV from the prompt's observation window (models/pruning.py).
visual[b, h, p] says whether the entry is one of the image's tokens (the `vfloor` policy's floor reads it);
`image_span` holds the image tokens' position ids [first, end) for the prompt being answered.
`next_position` continues from the unpruned prompt length, whatever was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ScoredKVCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, Hkv, P, Dh]
    values: list[torch.Tensor] = field(default_factory=list)  # per layer [B, Hkv, P, Dh]
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer [B, Hkv, P]
    positions: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, Hkv, P] int64
    visual: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, Hkv, P] bool
    next_position: int = 0
    budget: tuple[int, int] | None = None  # (heavy, recent); None = never evict
    image_span: torch.Tensor | None = None  # [2] int64: position ids [first, end) of the image tokens

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, i: int):
        """(key, value, score, positions, visual) of layer i; Nones before its first store."""
        if i < len(self.keys):
            return self.keys[i], self.values[i], self.scores[i], self.positions[i], self.visual[i]
        return None, None, None, None, None

    def store(self, i: int, key: torch.Tensor, value: torch.Tensor, score: torch.Tensor,
              positions: torch.Tensor | None = None, visual: torch.Tensor | None = None) -> None:
        entry = (key, value, score, positions, visual)
        if i < len(self.keys):
            for column, item in zip((self.keys, self.values, self.scores, self.positions, self.visual), entry):
                column[i] = item
        else:
            for column, item in zip((self.keys, self.values, self.scores, self.positions, self.visual), entry):
                column.append(item)
