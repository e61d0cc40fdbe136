"""Long generation on the PyTorch reference: 2,000 decode steps with eviction never grow the cache past
heavy + recent, in any layer, positions keep counting from the unpruned prompt length, and the cache
says which tokens each head holds.
(The ONNX runtime's twin is tests/runtime/test_run_bundle.py; memory over such a run is measured by
benchmarks/long_generation.py.)"""

from __future__ import annotations

import torch

from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava


def test_cache_never_exceeds_the_budget_over_2000_decode_steps(tiny_llava_dir):
    torch.manual_seed(0)
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(heavy_budget=6, recent_budget=4, policy="h2o"))
    embeds = model.splice(torch.tensor([[1, 4, 6, 127, 8, 9, 14, 7, 5, 6]]), model.encode_image(torch.randn(1, 3, 112, 112)).embeds)
    L = embeds.shape[1]  # [1, L, D]
    logits, cache, positions = model.prefill(embeds)
    assert positions.shape[1] == 10 < L  # Stage 2 at prefill: heavy 6 + recent 4 of L tokens
    for held in cache.positions:  # every head holds the prefill's kept tokens, by their position ids
        assert torch.equal(held, positions[:, None, :].expand_as(held))
    lengths = []
    for _ in range(2000):
        token = logits[:, -1].argmax(-1)  # [1]
        logits = model.decode_step(token.view(1, 1), cache)
        lengths.append({k.shape[2] for k in cache.keys} | {v.shape[2] for v in cache.values} | {s.shape[2] for s in cache.scores})
        assert torch.isfinite(logits).all()
    assert all(sizes == {10} for sizes in lengths)  # every layer's key, value and score, at every step
    assert cache.next_position == L + 2000  # position ids continue from the original, unpruned length
    for held in cache.positions:  # which tokens each head holds: distinct, in order, the 4 newest among them
        assert held.shape == cache.scores[0].shape
        assert (held.diff(dim=-1) > 0).all()
        assert torch.equal(held[..., -4:], torch.arange(L + 2000 - 4, L + 2000).expand_as(held[..., -4:]))
        heavy = held[..., :-4]
        assert ((heavy < L + 2000 - 4) & ((heavy >= L) | torch.isin(heavy, positions))).all()
