"""Pruning-aware fine-tuning: the soft Stage 1 in the training forward, and its masks."""

import torch
from transformers import LlavaForConditionalGeneration

from vtprune.models.embedded import batches, data, finetune, train
from vtprune.models.embedded import model as net
from vtprune.models.embedded import tokenizer as T
from vtprune.models.pruning import select_visual_tokens


def _model():
    tok = T.build()
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(net.model_config(len(tok), 4, 0, 2, 3))


def test_soft_stage1_keeps_the_hard_set_and_passes_gradient():
    model = LlavaForConditionalGeneration.from_pretrained(train.EMBEDDED_DIR)  # a tower whose CLS curve has a tail
    px = net.pixel_values([data.make_scene("test", 0, i).image for i in range(2)])
    feats, keep, bias, scores = finetune.pruned_features(model, px, alpha=0.075)
    scores = scores.detach()
    assert feats.shape[:2] == keep.shape == bias.shape and keep.shape[1] < 576
    for b in range(2):
        hard = select_visual_tokens(scores[b : b + 1])[0]
        kept = set(keep[b].tolist())
        assert set(hard.tolist()) <= kept  # the soft set holds inference's hard set
        assert float(bias[b][torch.isin(keep[b], hard)].detach().min()) >= torch.log(torch.tensor(0.5)) - 1e-5
    # the answers' gradient reaches the layer that scores the patches, through the mask
    (feats.sum() + bias.sum()).backward()
    q = model.model.vision_tower.encoder.layers[2].self_attn.q_proj.weight
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


def test_text_mask_without_bias_is_the_causal_mask():
    model = _model().eval()
    lm = model.model.language_model
    lm.set_attn_implementation("eager")
    emb = torch.randn(2, 12, lm.config.hidden_size)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    four_d = batches.turn_mask(torch.where(mask.bool(), 0, -1))  # one turn: causal + padding
    with torch.no_grad():
        ref = lm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        ours = lm(inputs_embeds=emb, attention_mask=finetune.text_mask(four_d, 3, torch.zeros(2, 4))).last_hidden_state
        masked = lm(inputs_embeds=emb, attention_mask=finetune.text_mask(four_d, 3, torch.full((2, 4), -1e4))).last_hidden_state
    assert torch.allclose(ref[0], ours[0], atol=1e-5) and torch.allclose(ref[1, :9], ours[1, :9], atol=1e-5)
    # a visual key with log m -> -inf is gone: positions before it are unchanged, after it they differ
    assert torch.allclose(ref[:, :3], masked[:, :3], atol=1e-5)
    assert not torch.allclose(ref[0, 7:], masked[0, 7:], atol=1e-3)


def test_a_short_fine_tune_runs_pruned_steps_with_stage2_and_saves(tmp_path):
    """The loop end to end on the shipped checkpoint: pruned steps (soft Stage 1, Stage 2 replayed) then a
    full one; the checkpoint it writes loads, with weights that moved."""
    import json

    out = tmp_path / "ft"
    result = finetune.finetune(train.EMBEDDED_DIR, out, minutes=0.1, seed=0, alpha=0.075, batch=2, turns=4,
                               log_path=None)  # fmt: skip
    assert result["steps"] >= 1 and json.loads((out / "training.json").read_text())["mode"] == "finetune-pruned"
    before = LlavaForConditionalGeneration.from_pretrained(train.EMBEDDED_DIR)
    after = LlavaForConditionalGeneration.from_pretrained(out)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.state_dict()[w], after.state_dict()[w])
    assert after.model.language_model.config._attn_implementation != finetune.eviction_sim.NAME
