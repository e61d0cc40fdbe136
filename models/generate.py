"""Generation on the reference model: a few small functions, the image only at prefill.

`sample` is shared in spirit with the runtime's NumPy sampler: greedy at temperature 0, otherwise
temperature then nucleus (top-p) filtering, drawn from a seeded generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vtprune.models.reference import PrunedLlava


@dataclass
class Generation:
    token_ids: list[int]
    visual_tokens_kept: int
    visual_tokens_total: int
    prompt_tokens: int  # seen by the LLM after both stages
    cache_tokens: int  # cache length per layer at the end
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    kept_index: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PrunedLlava,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    selector=None,
) -> Generation:
    """Answer one prompt: input_ids [1, T] with one image token, pixel_values [1, 3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    image = model.encode_image(pixel_values, selector) if pixel_values is not None else None
    t1 = time.perf_counter()
    embeds = model.splice(input_ids, image.embeds if image is not None else None)
    logits, cache, positions = model.prefill(embeds, model.image_span(input_ids, image.embeds if image is not None else None))
    t2 = time.perf_counter()
    tokens: list[int] = []
    for step in range(max_new_tokens):
        token = sample(logits[:, -1], temperature, top_p, generator)  # [1]
        tokens.append(int(token))
        if on_token is not None:
            on_token(int(token))
        if eos_token_id is not None and int(token) == eos_token_id or step == max_new_tokens - 1:
            break
        logits = model.decode_step(token.view(1, 1), cache)
    t3 = time.perf_counter()
    return Generation(
        token_ids=tokens,
        visual_tokens_kept=image.kept_index.shape[1] if image is not None else 0,
        visual_tokens_total=model.num_patches if image is not None else 0,
        prompt_tokens=positions.shape[1],
        cache_tokens=cache.length,
        vision_ms=(t1 - t0) * 1000,
        prefill_ms=(t2 - t1) * 1000,
        decode_ms=(t3 - t2) * 1000,
        kept_index=image.kept_index[0].tolist() if image is not None else [],
    )
