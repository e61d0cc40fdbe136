"""The KV cache with attention scores: one small explicit object, per layer (key, value, score).

positions[b, h, p] is the position id of that entry (which token it is: eviction differs per head).
score[b, h, p] is the attention that cached position p has received so far (summed over the query
heads of KV head h and over every query: prefill and each decode step). H2O eviction reads it.
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
    next_position: int = 0
    budget: tuple[int, int] | None = None  # (heavy, recent); None = never evict

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, i: int):
        if i < len(self.keys):
            return self.keys[i], self.values[i], self.scores[i], self.positions[i]
        return None, None, None, None

    def store(self, i: int, key: torch.Tensor, value: torch.Tensor, score: torch.Tensor,
              positions: torch.Tensor | None = None) -> None:
        if i < len(self.keys):
            self.keys[i], self.values[i], self.scores[i], self.positions[i] = key, value, score, positions
        else:
            self.keys.append(key), self.values.append(value), self.scores.append(score), self.positions.append(positions)
