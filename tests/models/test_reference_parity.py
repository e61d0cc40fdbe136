"""With pruning off, the reference computes what `transformers` computes: logits within 1e-5, same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava, weight_files
from vtprune.models.reference import PrunedLlava

from tiny_models import save_tiny_llava

TOL = 1e-5


def _prompt(model: PrunedLlava, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, model.image_token_id - 1, (1, 9), generator=g)
    input_ids = torch.cat([text[:, :3], torch.tensor([[model.image_token_id]]), text[:, 3:]], dim=1)  # [1, 10]
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g)
    return input_ids, pixels


def _hf_ids(model: PrunedLlava, input_ids):
    """transformers expects the image token repeated once per image feature."""
    i = int((input_ids[0] == model.image_token_id).nonzero())
    image = torch.full((1, model.num_patches), model.image_token_id)
    return torch.cat([input_ids[:, :i], image, input_ids[:, i + 1 :]], dim=1)


@pytest.mark.parametrize("variant", ["gqa", "mha", "sharded"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, variant):
    path = save_tiny_llava(tmp_path / variant, seed=1, gqa=variant != "mha", shard=variant == "sharded")
    if variant == "sharded":
        assert len(weight_files(path)) > 1  # really exercises the index
    ours = PrunedLlava(load_llava(path), PruneConfig.off())
    hf = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    input_ids, pixels = _prompt(ours)

    image = ours.encode_image(pixels)
    assert image.kept_index.shape[1] == ours.num_patches
    logits, cache, _ = ours.prefill(ours.splice(input_ids, image.embeds))
    with torch.no_grad():
        out = hf(input_ids=_hf_ids(ours, input_ids), pixel_values=pixels, use_cache=True)
    diff = (logits - out.logits).abs().max().item()
    assert diff < TOL, f"prefill logits differ by {diff:.2e}"

    past = out.past_key_values
    hf_next = out.logits[:, -1].argmax(-1, keepdim=True)
    our_next = logits[:, -1].argmax(-1, keepdim=True)
    for step in range(32):
        assert int(our_next) == int(hf_next), f"greedy tokens diverge at step {step}"
        logits = ours.decode_step(our_next, cache)
        with torch.no_grad():
            out = hf(input_ids=hf_next, cache=past, use_cache=True)
        past = out.past_key_values
        diff = (logits[:, -1] - out.logits[:, -1]).abs().max().item()
        assert diff < TOL, f"decode step {step}: logits differ by {diff:.2e}"
        our_next = logits[:, -1].argmax(-1, keepdim=True)
        hf_next = out.logits[:, -1].argmax(-1, keepdim=True)


def test_stage1_keeping_everything_is_the_unpruned_tower(tiny_llava_dir):
    """Pruning after layer 3 with a keep-all selector must not change the features (gather is exact)."""
    model = PrunedLlava(load_llava(tiny_llava_dir))
    pixels = torch.randn(1, 3, 112, 112)
    keep_all = lambda scores: torch.arange(scores.shape[1]).unsqueeze(0)  # noqa: E731
    ours = model.encode_image(pixels, selector=keep_all)
    with torch.no_grad():
        hf = model.hf.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert (ours.embeds[0] - hf).abs().max().item() < TOL
    assert ours.cls_scores.shape == (1, model.num_patches)
    assert abs(float(ours.cls_scores.sum()) - 1.0) < 0.5  # probabilities, CLS column dropped


def test_stage1_k_is_per_image(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir))
    ks = set()
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(1, 3, 112, 112, generator=g) * (1 + seed)
        image = model.encode_image(pixels)
        k = image.kept_index.shape[1]
        assert image.embeds.shape[1] == k and 1 <= k <= model.num_patches
        ks.add(k)
    assert len(ks) > 1, "every image gave the same k"
