"""The embedded model's shape and the pieces of its forward pass that training calls one by one.

`model_config` is the geometry the shipped checkpoint has (LLaVA-1.5's tokens, narrow widths); the functions
below run the vision tower, the projector (with the curriculum's pooling) and the image-token splice the way
`LlavaForConditionalGeneration` does, so that losses can reach into each part. `AuxHeads` are the
training-only readouts the losses use (they are not saved with the checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from vtprune.models.embedded import data
from vtprune.models.embedded import tokenizer as tokenizer_mod
from vtprune.models.pruning import cls_attention_scores


def model_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int) -> LlavaConfig:
    """LLaVA-1.5's token geometry (336 px, patch 14, 576 + CLS, layer -2, `default`), narrow widths."""
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        image_size=data.IMAGE_SIZE, patch_size=data.PATCH, hidden_act="quick_gelu", projection_dim=128,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=data.GRID * data.GRID,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
    )


class AuxHeads(torch.nn.Module):
    """Training-only readouts: dense labels from the feature layer, the scene summary from CLS, and
    object coordinates from the language model's middle layer (`coords`: two objects' (x, y))."""

    def __init__(self, width: int, text_width: int):
        super().__init__()
        # normalised input, zero weights: the head starts at the image centre and pulls on the
        # language model only as fast as it learns
        self.coords = torch.nn.Sequential(torch.nn.LayerNorm(text_width, elementwise_affine=False),
                                          torch.nn.Linear(text_width, 4))  # fmt: skip
        torch.nn.init.zeros_(self.coords[1].weight)
        torch.nn.init.constant_(self.coords[1].bias, 0.5)
        nc, ns = len(data.COLOURS), len(data.SHAPES)
        self.patch = torch.nn.Linear(width, (nc + 1) + (ns + 1) + (len(data.SIZES) + 1) + 2 + 2 + (len(data.REGIONS) + 1))
        self.summary = torch.nn.Sequential(
            torch.nn.LayerNorm(width),
            torch.nn.Linear(width, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, data.N_COMBOS + (nc + ns + 1) * (data.MAX_OBJECTS + 1) + len(data.REGIONS)),
        )


def pixel_values(images) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (what CLIPImageProcessor does to them). [B, 3, 336, 336]"""
    x = np.stack([np.asarray(im, np.float32) for im in images]) / 255.0  # [B, H, W, 3]
    x = (x - np.array(tokenizer_mod.CLIP_MEAN, np.float32)) / np.array(tokenizer_mod.CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def cls_attention(vision_tower, pixels: torch.Tensor, layer: int = 3) -> torch.Tensor:
    """Attention from CLS to the 576 patch keys in encoder layer `layer` (1-based), mean over heads. [B, 576]"""
    hidden = vision_tower(pixels, output_hidden_states=True).hidden_states[layer - 1]  # [B, 577, D] input of it
    return cls_attention_scores(vision_tower.encoder.layers[layer - 1], hidden)


def vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features of the feature layer (-2, CLS dropped: the `default` strategy), no gradient. [B, 576, Dv]"""
    with torch.no_grad():
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        return hs[model.config.vision_feature_layer][:, 1:]


def project(model, feats: torch.Tensor, pool: int) -> torch.Tensor:
    """Patch features -> average-pooled pool x pool (curriculum) -> projector. [B, (24/pool)^2, Dt]"""
    if pool > 1:
        b, n, d = feats.shape
        g = data.GRID
        feats = F.avg_pool2d(feats.transpose(1, 2).reshape(b, d, g, g), pool)  # [B, Dv, g/p, g/p]
        feats = feats.flatten(2).transpose(1, 2)  # [B, (g/p)^2, Dv]
    return model.model.multi_modal_projector(feats)  # [B, n, Dt]


def image_embeds(model, pixels: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """What the language model sees of an image (the tower learns only from its own labels). [B, n, Dt]"""
    return project(model, vision_features(model, pixels), pool)


def merge(model, ids: torch.Tensor, img: torch.Tensor, image_id: int) -> torch.Tensor:
    """Text embeddings with the image embeddings scattered into the image-token positions. [B, S, Dt]"""
    emb = model.model.language_model.embed_tokens(ids)  # [B, S, Dt]
    mask = (ids == image_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(mask, img.to(emb.dtype))
