"""The shipped checkpoint: llava-hf layout, loads in transformers, under 25 MB, answers above chance."""

import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from vtprune.models.embedded import data
from vtprune.models.embedded import model as net
from vtprune.models.embedded import tokenizer as tokenizer_mod
from vtprune.models.embedded import train

EMBEDDED = train.EMBEDDED_DIR
pytestmark = pytest.mark.skipif(not (EMBEDDED / "config.json").exists(), reason="no shipped checkpoint yet")


@pytest.fixture(scope="module")
def model():
    return LlavaForConditionalGeneration.from_pretrained(EMBEDDED).eval()


def test_layout_and_size():
    names = {p.name for p in EMBEDDED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"preprocessor_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # safetensors only
    assert sum(p.stat().st_size for p in EMBEDDED.iterdir()) < 25 * 2**20


def test_geometry_and_image_token(model):
    cfg = model.config
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    assert cfg.model_type == "llava"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")


def test_generate_matches_the_training_evaluator(model):
    """transformers' generate and the KV-cached greedy loop used for validation give the same answer."""
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    s = data.make_sample("test", 0, 4)  # a description: a long answer
    px = net.pixel_values([s.image])
    ids = tok(tokenizer_mod.PROMPT.format(question=s.question).replace("<image>", "<image>" * 576),
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=60, do_sample=False)
        ours = train.greedy(model, tok, net.image_embeds(model, px, 1), s.question, 60, model.config.image_token_id)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == ours


def test_existence_is_above_chance(model):
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    samples = [data.make_sample("test", 7, i, kind="exist") for i in range(24)]
    right = 0
    for s in samples:
        img = net.image_embeds(model, net.pixel_values([s.image]), 1)
        right += data.score(s.kind, train.greedy(model, tok, img, s.question, 2, model.config.image_token_id), s.answer)
    assert right / len(samples) > 0.6
