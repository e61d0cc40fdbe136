"""Tiny random LLaVA checkpoints saved by `transformers` itself (llava-hf layout), for fast tests."""

from __future__ import annotations

import torch


def tiny_llava_config(gqa: bool = True, image_size: int = 112, vision_layers: int = 4, vocab: int = 128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, vocab_size=vocab, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1)


def save_tiny_llava(path, seed: int = 0, shard: bool = False, **kwargs):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**kwargs)).eval()
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return path
