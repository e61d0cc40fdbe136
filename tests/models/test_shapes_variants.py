"""ModelShape against the checkpoints transformers builds (issue 20): an explicit `head_dim` (the KV cache per token
then is kv_heads * head_dim, not hidden / heads) and biased q/k/v/o projections are counted as transformers counts
its parameters."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import tiny_llava_config
from vtprune.models.shapes import ModelShape


@pytest.mark.parametrize("variant", [{}, {"head_dim": 16}, {"attention_bias": True}, {"head_dim": 4, "attention_bias": True}],
                         ids=["plain", "head-dim-16", "attention-bias", "head-dim-4-biased"])
def test_parameter_count_and_kv_width_match_transformers(variant):
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config()
    for key, value in variant.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    as_saved = json.loads(config.to_json_string())  # what config.json holds
    shape = ModelShape.from_config(as_saved)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    k_proj = model.model.language_model.layers[0].self_attn.k_proj
    assert shape.text.kv_dim == k_proj.out_features  # the cache width per layer and token (keys; values alike)
    assert shape.text.q_dim == model.model.language_model.layers[0].self_attn.q_proj.out_features
