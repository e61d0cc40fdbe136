"""Pruning-aware fine-tuning, the paper's second mode (its Table 3): `vtprune train --finetune-pruned`.

Training continues with Stage 1 in the loop. Inference's hard keep-set (k = i*) passes no gradient,
so here the pruner's decision is the soft keep-mask m_j = sigmoid((d_j - d_{i*}) / (alpha d_{i*}))
(`pruning.soft_keep_mask`; alpha as its temperature is this project's reading, design.md), applied as
an additive attention bias log m_j on each visual token's key, in the vision layers after the pruning
layer and in the language model. m -> 1 keeps a token and m -> 0 removes it, so the forward pass is
inference's pruning with its edge softened by alpha: the language model learns on the token sets
Stage 1 hands it, computed the way the pruned graph computes them (the later vision layers see only
the kept tokens), and the answers' gradient reaches the CLS scores through m.
Tokens with m below `FLOOR` are dropped outright (their bias would all but mask them), which keeps
steps short: a pruned step costs a fraction of a step on all 576 tokens.
On the pruned steps Stage 2 is in the loop too: each answer token sees only what H2O's decode-time
eviction leaves in its layer's cache at that step (`eviction_sim`, exact to the reference's decode).
Without it a description, written ~50 tokens long under a cache held at the ~56-token prompt, lost a
sixth of its accuracy to Stage 2 that the model never saw in training (describe 0.71 -> 0.61, step 7).
Every `FULL_EVERY`-th step runs on all 576 tokens, as the base recipe does: fine-tuned on pruned steps
alone, the model forgot the full token set (an earlier checkpoint's test accuracy on all tokens went
0.748 -> 0.665, descriptions the most); with every other step on them it went 0.894 -> 0.914 while pruned
accuracy went 0.608 -> 0.841 (47 minutes). Once the full model was at 0.95 (step 8 of the model card), one
step in three was enough for it and the pruned descriptions needed the steps more; at 0.964 (step 10), one in
four (step 11: full 0.966, vtprune 0.932 -> 0.944 on 1000 test items). Another 55 minutes so (step 12) raised
the full model (0.969) and not vtprune (0.944); one step in six at half the language model's peak rate (step 13,
40 minutes) moved vtprune to 0.960 and the full model to 0.971.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from vtprune.models.embedded import batches, data, eviction_sim, losses
from vtprune.models.embedded import model as net
from vtprune.models.embedded import tokenizer as tokenizer_mod
from vtprune.models.embedded import train as T
from vtprune.models.pruning import cls_attention_scores, soft_keep_mask

FLOOR = 1e-3
FULL_EVERY = 6


def pruned_features(model, pixels: torch.Tensor, alpha: float, prune_layer: int = 3):
    """Vision tower with the soft Stage 1 inside.

    pixels [B, 3, 336, 336] -> (features [B, K, Dv] of each image's K best patches in spatial order,
    keep [B, K] their patch indices, bias [B, K] = log m of each, scores [B, 576]). K is the largest
    number of patches with m >= FLOOR in the batch; an image with fewer keeps its next best with
    their (tiny) log m, as the soft mask says."""
    vision = model.model.vision_tower
    layers = vision.encoder.layers
    fl = model.config.vision_feature_layer
    depth = fl if fl >= 0 else len(layers) + 1 + fl
    h = vision.pre_layrnorm(vision.embeddings(pixels))  # [B, 577, Dv]
    for i in range(prune_layer - 1):
        h = layers[i](h, None)
    scores = cls_attention_scores(layers[prune_layer - 1], h)  # [B, 576]
    h = layers[prune_layer - 1](h, None)
    m = soft_keep_mask(scores, alpha)  # [B, 576]
    k = int((m >= FLOOR).sum(-1).max())
    keep = torch.sort(torch.topk(m.detach(), k, dim=-1).indices, dim=-1).values  # [B, K] spatial order
    bias = torch.log(torch.gather(m, 1, keep).clamp_min(1e-30))  # [B, K]
    patches = h[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    h = torch.cat([h[:, :1], patches], 1)  # [B, 1+K, Dv]
    key_bias = torch.cat([torch.zeros_like(bias[:, :1]), bias], 1)[:, None, None, :]  # [B, 1, 1, 1+K]
    for i in range(prune_layer, depth):
        h = layers[i](h, key_bias.expand(-1, 1, h.shape[1], -1))
    return h[:, 1:], keep, bias, scores


def text_mask(mask: torch.Tensor, first_image: int, bias: torch.Tensor) -> torch.Tensor:
    """The additive mask [B, 1, S, S] (`train.turn_mask`) with log m added on the visual keys."""
    vis = torch.zeros(mask.shape[0], mask.shape[-1])
    vis[:, first_image : first_image + bias.shape[1]] = bias.clamp_min(-1e4)
    return mask + vis[:, None, None, :]


def finetune(init: Path, out: Path, minutes: float, seed: int, alpha: float, batch: int, turns: int,
             log_path: Path | None) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = tokenizer_mod.build()
    model = LlavaForConditionalGeneration.from_pretrained(init)
    image_id = model.config.image_token_id
    # eager attention (a float mask, the grounding losses' probabilities) that also replays Stage 2's eviction
    model.model.language_model.set_attn_implementation(eviction_sim.NAME)
    batcher = batches.Batcher(tok, seed, turns)
    batcher.index = 20_000_000  # scenes neither earlier run has seen
    heads = net.AuxHeads(model.config.vision_config.hidden_size, model.config.text_config.hidden_size)
    vision = list(model.model.vision_tower.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW([{"params": rest, "peak": 1.5e-4}, {"params": vision, "peak": 1e-4},
                             {"params": list(heads.parameters()), "peak": 1e-3}], weight_decay=0.01)  # fmt: skip
    log = open(log_path, "a") if log_path else None
    t0, budget, step = time.time(), minutes * 60, 0
    bar = tqdm(total=int(budget), desc="pruning-aware fine-tuning", unit="s", mininterval=5.0,
               bar_format="{l_bar}{bar}| {n}/{total}s {postfix}")  # fmt: skip
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = T.lr_at(frac, g["peak"], warm=0.05)
        scenes = batcher.scenes(batch, batches.Curriculum(1, data.MAX_OBJECTS, None))
        px = net.pixel_values([s.image for s in scenes])
        if step % FULL_EVERY == FULL_EVERY - 1:  # all 576 tokens: the full model must not forget them
            ids, targets, weights, mask, position, ground = batcher.text_batch(scenes, data.GRID**2, rng)
            img = model.model.multi_modal_projector(net.vision_features(model, px))
            tokens, stage2 = data.GRID**2, None
        else:
            feats, keep, bias, _ = pruned_features(model, px, alpha)
            keeps = [k.numpy() for k in keep]
            ids, targets, weights, mask, position, ground = batcher.text_batch(scenes, keep.shape[1], rng, keeps)
            img = model.model.multi_modal_projector(feats)
            mask = text_mask(mask, int((ids[0] == image_id).nonzero()[0]), bias)
            tokens = keep.shape[1]
            # budgets from the prompt inference would have: the soft set's extra tokens (m < 0.5) do not count
            beyond = (bias.detach() < np.log(0.5) - 1e-6).sum(-1)
            stage2 = eviction_sim.Plan.from_batch(targets, mask, beyond)
        loss, parts = losses.text_loss(model, ids, targets, weights, mask, position, img, image_id, ground, heads,
                                  stage2=stage2)  # fmt: skip
        # the tower keeps its own labels (one full pass on two images), so that the answers' gradient
        # through m does not pull it away from what its later layers were trained to compute
        hs = model.model.vision_tower(px[:2], output_hidden_states=True).hidden_states
        aux, aux_parts = losses.vision_loss(model, heads, None, batches.dense_targets(scenes[:2]), hs)
        loss = loss + 0.3 * aux
        T.optimizer_step(opt, loss)
        step += 1
        parts.update(tokens=float(tokens), cls=aux_parts["cls"])
        bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in parts.items()), refresh=False)
        bar.update(int(time.time() - t0) - bar.n)
        if log and step % 25 == 0:
            log.write(json.dumps({"stage": "finetune-pruned", "step": step, **parts,
                                  "minutes": round((time.time() - t0) / 60, 2)}) + "\n")  # fmt: skip
            log.flush()
    bar.close()
    model.model.language_model.set_attn_implementation("sdpa")
    training = {"mode": "finetune-pruned", "init": str(init), "alpha": alpha, "minutes": (time.time() - t0) / 60,
                "steps": step, "seed": seed, "threads": torch.get_num_threads()}  # fmt: skip
    T.save_checkpoint(model, out, training)
    if log:
        log.close()
    return {"out": str(out), "minutes": round(training["minutes"], 1), "steps": step}
