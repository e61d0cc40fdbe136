"""The training losses: the vision tower's auxiliary targets, the grounding losses, the answers' cross-entropy.

Why auxiliary targets: from the answers alone a small LLaVA trained from scratch stays at the answer prior
(design.md, "The embedded model"); dense per-patch labels and a CLS scene summary teach the tower (and make
CLS attention concentrate on objects, which Stage 1 relies on), and grounding losses show the language model's
heads where to look. The model card (checkpoint/README.md) says which of these the shipped model was trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.models.embedded import data
from vtprune.models.embedded.model import AuxHeads, merge
from vtprune.models.pruning import cls_attention_scores


def vision_loss(model, heads: AuxHeads, pixels, targets, hs=None) -> tuple[torch.Tensor, dict]:
    """Dense per-patch labels at the feature layer + scene summary from CLS after layer 3."""
    if hs is None:
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    feats = hs[model.config.vision_feature_layer][:, 1:]  # [B, 576, Dv]
    nc, ns, nz = len(data.COLOURS) + 1, len(data.SHAPES) + 1, len(data.SIZES) + 1
    logits = heads.patch(feats)  # [B, 576, nc+ns+nz+2+2+regions]
    c, s, z, ce, xy, r = logits.split([nc, ns, nz, 2, 2, len(data.REGIONS) + 1], -1)
    grid = torch.arange(data.GRID, dtype=torch.float32) / (data.GRID - 1)
    pos = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(1, -1, 2)  # [1, 576, 2] (row, col)
    obj = (targets["colour"] > 0).float()
    w_obj = 1.0 + 4.0 * obj  # objects are a minority of patches: weigh them up
    parts = {
        "colour": (F.cross_entropy(c.transpose(1, 2), targets["colour"], reduction="none") * w_obj).mean(),
        "shape": (F.cross_entropy(s.transpose(1, 2), targets["shape"], reduction="none") * w_obj).mean(),
        "size": (F.cross_entropy(z.transpose(1, 2), targets["size"], reduction="none") * w_obj).mean(),
        "centre": F.cross_entropy(ce.transpose(1, 2), targets["centre"], weight=torch.tensor([1.0, 20.0])),
        "xy": F.mse_loss(xy, pos.expand_as(xy)) * 10,
        # every patch of an object names the object's region, so that any of its patches Stage 1 or
        # Stage 2 leaves can tell the language model where the object is (on background: 0)
        "region": (F.cross_entropy(r.transpose(1, 2), targets["region"], reduction="none") * w_obj).mean(),
    }
    # CLS attention in the pruning layer spread evenly over the object patches: the sorted curve then
    # has a cliff where the objects end, which is where the long-tail split point falls (Eq. 3)
    att = cls_attention_scores(model.model.vision_tower.encoder.layers[2], hs[2])  # [B, 576]
    has = obj.sum(-1) > 0
    spread = obj[has] / obj[has].sum(-1, keepdim=True)
    parts["cls"] = -(spread * torch.log(att[has] / att[has].sum(-1, keepdim=True) + 1e-6)).sum(-1).mean() * 0.2
    cls = hs[3][:, 0]  # [B, Dv] CLS after the pruning layer
    out = heads.summary(cls)
    m = data.MAX_OBJECTS + 1
    present, counts, regions = out.split([data.N_COMBOS, (nc - 1 + ns - 1 + 1) * m, len(data.REGIONS)], -1)
    counts = counts.view(len(cls), -1, m)  # [B, nc+ns+1, 6]
    count_t = torch.cat([targets["by_colour"], targets["by_shape"], targets["total"][:, None]], 1)  # [B, 12]
    parts["summary"] = (
        F.binary_cross_entropy_with_logits(present, targets["present"]) * 5
        + F.cross_entropy(counts.transpose(1, 2), count_t)
        + F.binary_cross_entropy_with_logits(regions, targets["regions"])
    )
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def grounding_loss(attentions, ground, first_image: int, n_image: int) -> torch.Tensor:
    """-log of the attention mass that the named head of the given layers puts on the target visual tokens.

    Why: the language model has to learn to find a few relevant tokens among hundreds (design.md), and
    from the answers alone that took longer than this machine has; these heads are shown where to look."""
    rows, pos, heads, hit = ground
    if len(rows) == 0:
        return torch.zeros(())
    losses = []
    for att in attentions:  # [B, H, S, S]
        a = att[rows, heads, pos, first_image : first_image + n_image]  # [G, n_image]
        losses.append(-torch.log((a * hit).sum(-1) + 1e-4).mean())
    return torch.stack(losses).mean()


def coord_loss(hidden: torch.Tensor, head: torch.nn.Module, coords) -> torch.Tensor:
    """Squared error of the object centres read linearly from `hidden` [B, S, D] at the given positions.

    Why: position questions sat near the prior and descriptions named the wrong thirds of the image
    with the answer heads on the right objects; this asks the middle layer to carry each object's
    (x, y) where the relation or the region is predicted, so that the layers above only compare."""
    rows, pos, slot, xy = coords
    if len(rows) == 0:
        return torch.zeros(())
    pred = head(hidden[rows, pos]).view(-1, 2, 2)[torch.arange(len(rows)), slot]  # [G, 2]
    return F.mse_loss(pred, xy.float()) * 10


def text_loss(model, ids, targets, weights, mask, position, img, image_id, ground=None,
              heads: AuxHeads | None = None, **lm_kwargs) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Weighted answer cross-entropy, the projector-scale penalty and (given `ground`) the grounding
    losses; `mask` is an additive [B, 1, S, S] attention mask (`turn_mask`), `position` the position ids;
    `lm_kwargs` go to the language model's attention (fine-tuning's `stage2` plan)."""
    emb = merge(model, ids, img, image_id)
    coords = ground is not None and heads is not None  # the centre readout comes with the grounding targets
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=position,
                                     output_attentions=ground is not None, output_hidden_states=coords,
                                     **lm_kwargs)  # fmt: skip
    hidden = out.last_hidden_state
    sel = weights > 0
    logits = model.lm_head(hidden[sel])  # [T, V]
    ce = F.cross_entropy(logits, targets[sel], reduction="none")
    loss = (ce * weights[sel]).sum() / ids.shape[0]
    scale = img.pow(2).mean(-1).sqrt()  # [B, n] rms of each projected token
    penalty = (scale - 1.0).pow(2).mean()
    parts = {"answer": loss.item(), "proj_rms": scale.mean().item()}
    if ground is not None:
        # answers: head 0 of layers 1.. (the answer position first has to read the question);
        # question words: head 0 of layer 0, whose query is the word itself (one hop)
        first = int((ids[0] == image_id).nonzero()[0])
        answers, words, names, centres = ground
        g = grounding_loss(out.attentions[1:], answers, first, img.shape[1])
        w = grounding_loss(out.attentions[:1], words, first, img.shape[1])
        n = grounding_loss(out.attentions[:1], names, 0, ids.shape[1])  # onto question words, not the image
        parts.update(ground=g.item(), words=w.item(), names=n.item())
        loss = loss + 0.5 * (g + w + n)
        if coords:
            middle = len(out.hidden_states) // 2  # after layer 2 of 4
            c = coord_loss(out.hidden_states[middle], heads.coords, centres)
            parts["coords"] = c.item()
            loss = loss + c
    return loss + 0.1 * penalty, parts
