"""Train the embedded LLaVA from scratch on the procedural question set (`vtprune train`).

Why this recipe (design.md, "The embedded model"): end to end from scratch, a small LLaVA stays at
the answer prior. What works is LLaVA's own split, with our stage A standing in for CLIP's
pretraining:
  A. vision only: dense per-patch labels (colour, shape, size, object centre, patch position) read
     from the feature layer (-2), plus a scene summary read from CLS after the pruning layer (3), so
     that CLS attention in that layer concentrates on objects (Stage 1 pruning relies on it), and a
     loss spreading that attention evenly over the object patches (the sorted curve's cliff, where
     the split point i* falls, is then where the objects end);
  B. projector + language model on several independent question/answer turns per image (each turn
     sees the image and itself, at a single-turn prompt's positions, as inference asks), no gradient from the
     answers into the vision tower (as in LLaVA), a penalty holding the projector's output scale
     near 1, and a curriculum: visual tokens average-pooled 4x4 then 2x2 (the language model first
     learns to read 36 tokens, then 144) with few large objects, then the real 576 and the full data;
     and grounding losses that tell attention heads where to look: head 0 of language-model layer 0,
     at each colour or shape word of a question, onto the visual tokens of that colour or shape (one
     hop: its query is the word itself); head 0 of layers 1.., at the position that predicts a one-word
     answer, onto the tokens of the objects the question is about (one head per object for a
     position question, so that the two objects' coordinates are not averaged together, fed by two
     heads of layer 0 that read the two names from the question in the order asked; each item of
     a description onto its own object), and the language model's middle layer asked to carry those
     objects' centres where a relation or a region is predicted. Without the grounding the language
     model stayed at the answer prior (its output did not depend on the image; see the model card). On the real 576 tokens, most
     steps drop the background down to a random number of patches (visual-token dropout): the
     language model learns to find the objects among as many tokens as Stage 1 leaves, and such a
     step costs a fraction of a full one.
Pruning-aware fine-tuning (the paper's second mode) is models/embedded/finetune.py (`--finetune-pruned`).
`--freeze-vision` stops the tower's training in stage B altogether (LLaVA's choice; here the tower's
shape recognition was still improving after stage A, so it keeps its labels by default).
Checkpoints are llava-hf folders (safetensors, tokenizer, preprocessor), written to a temporary name
and renamed. The auxiliary heads exist only during training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vtprune.errors import UserError
from vtprune.models.embedded import data
from vtprune.models.embedded import tokenizer as tokenizer_mod
from vtprune.models.loading import default_model_dir
from vtprune.models.pruning import cls_attention_scores

EMBEDDED_DIR = default_model_dir()  # checkpoint/ beside this file; save_checkpoint replaces that folder whole


# ---------------------------------------------------------------- model


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


# ---------------------------------------------------------------- batches


NEG = -1e9  # "masked" in additive attention masks (finite: a fully masked padding row gives no NaN)


@dataclass
class Chat:
    """One image's chat as token lists: ids, next-token targets (-100: none), loss weights, the turn
    each token belongs to (0: the shared prefix) and its position id."""

    ids: list[int]
    targets: list[int]
    weights: list[float]
    turn: list[int]
    position: list[int]


def turn_mask(turn: torch.Tensor) -> torch.Tensor:
    """[B, S] turn of each token (0 = shared prefix, -1 = padding) -> additive mask [B, 1, S, S]:
    causal, no padding keys, and each turn sees the prefix and itself only."""
    s = turn.shape[1]
    key = turn[:, None, :]  # [B, 1, S]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool)) & (key >= 0) & ((key == 0) | (key == turn[:, :, None]))
    return torch.where(allowed, 0.0, NEG)[:, None]


@dataclass
class Curriculum:
    pool: int  # visual tokens average-pooled pool x pool (1 = the real 576)
    max_objects: int
    sizes: list[str] | None


class Batcher:
    """Scenes, conversations and token ids, deterministic from the seed."""

    def __init__(self, tok, seed: int, turns: int):
        self.tok, self.seed, self.turns = tok, seed, turns
        self.index = 0
        self._ids: dict[str, list[int]] = {}
        self.image_id = tok.convert_tokens_to_ids(tokenizer_mod.IMAGE_TOKEN)
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._ids[text]

    def scenes(self, n: int, cur: Curriculum) -> list[data.Scene]:
        out = [data.make_scene("train", self.seed, self.index + i, cur.max_objects, cur.sizes) for i in range(n)]
        self.index += n
        return out

    def conversation(self, scene: data.Scene, n_image: int, rng, ground: list | None = None,
                     words: list | None = None, keep: np.ndarray | None = None, names: list | None = None,
                     coords: list | None = None) -> Chat:  # fmt: skip
        """Several question/answer turns about one image; the image stands as n_image image tokens.

        The turns are independent: each sees the shared prefix (BOS, "USER:", the image) and itself,
        at the positions a single-turn prompt has (`Chat.turn`, `Chat.position`), which is how every
        question is asked at inference; one vision pass and one prefix serve them all.
        The tokens are the 24x24 patches average-pooled to n_image, or the patches `keep` names (in
        spatial order). `ground` collects (position, head, [n_image] bool): where an answer word is
        predicted, which head should look, and at which visual tokens (the asked objects; for a
        position question head 0 at the first object and head 1 at the second, so that their
        coordinates are not averaged together; for a description, each item at its own object);
        `words` the same for each colour or shape word of a question and the tokens of that colour or shape;
        `names` (position, head, [positions]) for a position question: where its answer is predicted, and
        the question words naming the first object (head 1) and the second (head 2); `coords`
        (position, slot, (x, y)): the centre of the object (slot 0) or of the second object of a
        position question (slot 1) that the language model's middle layer should carry there."""
        ids = [self.bos] + self.ids("USER:") + [self.image_id] * n_image
        prefix = len(ids)
        targets, weights = [-100] * prefix, [0.0] * prefix
        turn, position = [0] * prefix, list(range(prefix))
        qas = data.conversation(scene, rng, self.turns)
        g = int(round(n_image**0.5))
        pool = data.GRID // g

        def view(hit):  # [24, 24] bool -> [n_image]
            if keep is not None:
                return hit.reshape(-1)[keep]
            return hit.reshape(g, pool, g, pool).any((1, 3)).reshape(-1)

        def objects(refs):
            return view(np.isin(scene.patch_object, [r + 1 for r in refs]))

        def centre(ref):
            o = scene.objects[ref]
            return (o.cx / data.IMAGE_SIZE, o.cy / data.IMAGE_SIZE)

        dense = scene.patch_targets() if words is not None else None
        for t, qa in enumerate(qas):
            prompt = self.ids(qa.question) + self.ids("ASSISTANT:")
            answer = self.ids(qa.answer) + [self.eos]
            refs = qa.meta.get("refs", [])
            first = len(ids) + len(prompt) - 1  # the position predicting answer[0]
            if ground is not None and qa.kind == "position":
                ground += [(first, 0, objects(refs[:1])), (first, 1, objects(refs[1:]))]
                if coords is not None:
                    coords += [(first, 0, centre(refs[0])), (first, 1, centre(refs[1]))]
                if names is not None:  # layer 0 first reads the two names apart, in the order asked
                    a, b = self.name_positions(self.ids(qa.question), scene.objects[refs[0]], scene.objects[refs[1]])
                    names += [(first, 1, [len(ids) + j for j in a]), (first, 2, [len(ids) + j for j in b])]
            elif ground is not None and qa.kind == "describe":
                for start, end, ref in self.describe_items(scene, answer):
                    ground += [(first + p, 0, objects([ref])) for p in range(start, end)]
                    if coords is not None:
                        coords += [(first + p, 0, centre(ref)) for p in range(start, end)]
            elif ground is not None and refs:
                ground.append((first, 0, objects(refs)))
            if words is not None:
                for j, tid in enumerate(self.ids(qa.question)):
                    hit = self.word_hit(tid, dense)
                    if hit is not None and hit.any():
                        words.append((len(ids) + j, 0, view(hit)))
            ids += prompt + answer
            turn += [t + 1] * (len(prompt) + len(answer))
            position += range(prefix, prefix + len(prompt) + len(answer))
            # predict answer[j] from the position before it; a turn weighs sqrt(its length): a one-word
            # answer is not drowned by a description, and a description's words are not starved (at
            # 1/length each, the description never got past its first word)
            targets += [-100] * (len(prompt) - 1) + answer + [-100]
            weights += [0.0] * (len(prompt) - 1) + [len(answer) ** -0.5 / len(qas)] * len(answer) + [0.0]
        return Chat(ids, targets, weights, turn, position)

    def name_positions(self, question: list[int], a: data.Obj, b: data.Obj) -> tuple[list[int], list[int]]:
        """Indices of the colour and shape words naming `a` (the first named) and `b` (after it) in a question."""
        words = [self.tok.convert_ids_to_tokens(t) for t in question]
        ia = [words.index(a.colour), words.index(a.shape)]
        ib = [ia[1] + 1 + words[ia[1] + 1 :].index(w) for w in (b.colour, b.shape)]
        return ia, ib

    def describe_items(self, scene: data.Scene, answer: list[int]) -> list[tuple[int, int, int]]:
        """(start, end, object) per item of a description: answer[start:end] are the item's words
        (from its size word to the comma or full stop after its region), in the description's order."""
        order = data.description_order(scene.objects)
        sizes = {self.tok.convert_tokens_to_ids(z) for z in data.SIZES}
        starts = [j for j, t in enumerate(answer) if t in sizes]
        ends = starts[1:] + [len(answer) - 1]
        return [(s, e - 1, ref) for s, e, ref in zip(starts, ends, order)]

    def word_hit(self, tid: int, dense: dict) -> np.ndarray | None:
        """[24, 24] patches of the colour or shape a question word names (None for other words)."""
        word = self.tok.convert_ids_to_tokens(tid)
        if word in data.COLOURS:
            return dense["colour"] == data.COLOUR_NAMES.index(word) + 1
        singular = {v: k for k, v in data.PLURAL.items()}.get(word, word)
        if singular in data.SHAPES:
            return dense["shape"] == data.SHAPES.index(singular) + 1
        return None

    def text_batch(self, scenes, n_image: int, rng, keeps: list | None = None):
        """Padded chats of a batch: ids, targets, weights, the additive attention mask [B, 1, S, S],
        position ids, and the packed grounding targets (answers, words, names, coords)."""
        grounds: list[list] = [[] for _ in scenes]
        words: list[list] = [[] for _ in scenes]
        names: list[list] = [[] for _ in scenes]
        coords: list[list] = [[] for _ in scenes]
        keeps = keeps or [None] * len(scenes)
        chats = [self.conversation(s, n_image, rng, g, w, k, a, c)
                 for s, g, w, k, a, c in zip(scenes, grounds, words, keeps, names, coords)]  # fmt: skip
        length = max(len(c.ids) for c in chats)
        ids = torch.full((len(chats), length), self.pad)
        targets = torch.full((len(chats), length), -100)
        weights = torch.zeros(len(chats), length)
        turn = torch.full((len(chats), length), -1)  # -1: padding
        position = torch.zeros(len(chats), length, dtype=torch.long)
        for i, c in enumerate(chats):
            n = len(c.ids)
            ids[i, :n], targets[i, :n], weights[i, :n] = torch.tensor(c.ids), torch.tensor(c.targets), torch.tensor(c.weights)
            turn[i, :n], position[i, :n] = torch.tensor(c.turn), torch.tensor(c.position)

        def pack(lists):  # -> ([G] row, [G] position, [G] head, [G, n_image] bool)
            where = [(i, pos, head) for i, g in enumerate(lists) for pos, head, _ in g]
            hits = [h for g in lists for _, _, h in g]
            return (
                torch.tensor([w[0] for w in where], dtype=torch.long),
                torch.tensor([w[1] for w in where], dtype=torch.long),
                torch.tensor([w[2] for w in where], dtype=torch.long),
                torch.from_numpy(np.stack(hits)) if hits else torch.zeros(0, n_image, dtype=torch.bool),
            )

        where = [(i, pos, head) for i, a in enumerate(names) for pos, head, _ in a]
        hits = torch.zeros(len(where), length, dtype=torch.bool)
        for g, (_, _, at) in enumerate(x for a in names for x in a):
            hits[g, at] = True
        named = tuple(torch.tensor([w[j] for w in where], dtype=torch.long) for j in range(3)) + (hits,)
        xy = pack([[(p, slot, np.array(c, np.float32)) for p, slot, c in cs] for cs in coords])
        return ids, targets, weights, turn_mask(turn), position, (pack(grounds), pack(words), named, xy)


def keep_objects(scenes, rng) -> list[np.ndarray]:
    """Visual-token dropout: every object patch of each scene plus the same number of background
    patches drawn at random (log-uniform, 4 to all), in spatial order. [K] int64 per scene.

    Why: the language model then learns to find objects among any number of tokens (what Stage 1
    hands it: a few dozen), and a step costs a fraction of one on all 576."""
    obj = [np.flatnonzero(s.patch_object.reshape(-1) > 0) for s in scenes]
    n_back = int(np.exp(rng.uniform(np.log(4), np.log(data.GRID**2))))
    total = min(max(len(o) for o in obj) + n_back, data.GRID**2)
    keeps = []
    for o in obj:
        back = np.setdiff1d(np.arange(data.GRID**2), o)
        keeps.append(np.sort(np.concatenate([o, rng.choice(back, total - len(o), replace=False)])))
    return keeps


def dense_targets(scenes) -> dict[str, torch.Tensor]:
    keys = ["colour", "shape", "size", "centre", "region"]
    per = [s.patch_targets() for s in scenes]
    out = {k: torch.from_numpy(np.stack([p[k] for p in per]).reshape(len(scenes), -1)) for k in keys}  # [B, 576]
    sums = [s.summary() for s in scenes]
    for k in ["present", "by_colour", "by_shape", "total", "regions"]:
        out[k] = torch.from_numpy(np.stack([s[k] for s in sums]))
    return out


# ---------------------------------------------------------------- losses


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


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model, tok, image_embeds_1: torch.Tensor, question: str, max_new: int, image_id: int) -> str:
    """Greedy answer for one image (any number of visual tokens) with the language model's KV cache."""
    n = image_embeds_1.shape[1]
    prompt = tokenizer_mod.PROMPT.format(question=question).replace(
        tokenizer_mod.IMAGE_TOKEN, tokenizer_mod.IMAGE_TOKEN * n)  # fmt: skip
    ids = tok(prompt, return_tensors="pt").input_ids  # [1, S]
    emb = merge(model, ids, image_embeds_1, image_id)
    lm = model.model.language_model
    out = lm(inputs_embeds=emb, use_cache=True)
    cache, last, new = out.cache, out.last_hidden_state[:, -1], []
    for step in range(max_new):
        nxt = int(model.lm_head(last).argmax(-1))
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        pos = torch.tensor([[ids.shape[1] + step]])
        out = lm(inputs_embeds=lm.embed_tokens(torch.tensor([[nxt]])), cache=cache, use_cache=True, position_ids=pos)
        cache, last = out.cache, out.last_hidden_state[:, -1]
    return tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tok, split: str, seed: int, n: int, pool: int = 1, image_id: int = 4) -> dict:
    """Accuracy per kind on the first n items of a split (kinds cycle, so any n is balanced)."""
    model.eval()
    scores: dict[str, list[float]] = {k: [] for k in data.KINDS}
    attn_share = []
    for i in range(n):
        s = data.make_sample(split, seed, i)
        px = pixel_values([s.image])
        img = image_embeds(model, px, pool)
        pred = greedy(model, tok, img, s.question, 80 if s.kind == "describe" else 4, image_id)
        scores[s.kind].append(data.score(s.kind, pred, s.answer))
        a = cls_attention(model.model.vision_tower, px)[0]  # [576]
        attn_share.append(float(a[torch.from_numpy(s.patch_labels.reshape(-1) > 0)].sum()))
    model.train()
    by_kind = {k: float(np.mean(v)) for k, v in scores.items() if v}
    return {
        "n": n,
        "accuracy": float(np.mean([x for v in scores.values() for x in v])),
        "by_kind": by_kind,
        "cls_attention_on_objects": float(np.mean(attn_share)),
    }


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(model, out: Path, extra: dict | None = None) -> None:
    """llava-hf folder: config, safetensors, tokenizer, preprocessor; written aside, then renamed."""
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer_mod.save(tmp)
    if extra:
        (tmp / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(model_dir: Path, test: dict, training: dict, command: str) -> None:
    """README.md beside the weights: what the model is, how it was trained, what it scores per kind."""
    n_params = training.get("params_m", float("nan"))
    # the most frequent answer's share on the test split (measured over 400 items per kind)
    chance = {"exist": "0.50 (yes/no alternate)", "count": "0.53 (0)", "colour": "0.22 (purple)", "position": "0.27 (below)",
              "describe": "0 (F1)"}  # fmt: skip
    rows = "\n".join(f"| {k} | {v:.3f} | {chance[k]} |" for k, v in test["by_kind"].items())
    evals = "\n".join(
        f"| {h['minutes']:.0f} | {h.get('tokens', 576)} | {h['accuracy']:.3f} | "
        + " | ".join(f"{h['by_kind'].get(k, float('nan')):.2f}" for k in data.KINDS) + " |"
        for h in training.get("history", []) if h.get("stage") == "B-eval"
    )  # fmt: skip
    text = f"""# vtprune embedded LLaVA (tiny, trained from scratch)

A {n_params:.1f}M-parameter LLaVA-1.5-shaped model (llava-hf layout) trained on this project's procedural
visual-question set (`vtprune.models.embedded.data`). It exists because no pretrained LLaVA weights can be downloaded
where vtprune is developed; it gives every stage of the pipeline (pruning, ONNX export, quantization,
runtime) a model whose answers can be checked. It knows nothing about real photos.

- Geometry: CLIP vision tower at 336 px, patch 14 (576 patches + CLS), 128 wide x 6 layers; feature layer -2,
  `default` select strategy; 2-layer GELU projector; Llama text model 256 wide x 4 layers, 4 heads;
  word-level tokenizer (`<image>` is one token); prompt `USER: <image>\\n{{question}} ASSISTANT:`.
- Data: 336x336 images of 1-5 flat shapes ({len(data.SHAPES)} shapes x {len(data.COLOURS)} colours x 3 sizes) on
  textured, muted backgrounds; objects cover a minority of the patches (6% on average). Question kinds:
  existence (POPE-like balanced negatives: random / popular / adversarial), counting, colour, relative
  position, description (long answer, scored by F1 over (size, colour, shape, region)).
- Training (`vtprune train`, CPU, {training.get('threads', 1)} threads): stage A trains the vision tower
  alone on dense per-patch labels, a scene summary read from CLS after layer 3, and a loss spreading layer
  3's CLS attention evenly over the object patches (so that the sorted CLS curve has its cliff where the
  objects end, which is where the long-tail split falls); stage B trains projector + language model on 8
  independent question/answer turns per image (each at a single-turn prompt's positions), with a penalty
  holding the projector's output scale near 1, visual-token dropout (on 70% of the steps only the object
  patches and a log-uniform number of background patches are kept), and grounding losses on attention: head
  0 of layer 0 at each colour/shape word of a question onto the tokens of that colour/shape; head 0 of
  layers 1-3 at the position predicting a one-word answer onto the asked-about objects (a position question:
  head 0 onto the first object, head 1 onto the second, after heads 1 and 2 of layer 0 read the two names
  from the question); at each item of a description, head 0 onto that item's object; and a readout of those
  objects' centres from the language model's middle layer at the same positions. The answers send no
  gradient into the vision tower (as in LLaVA); it keeps learning from its own labels at a lower rate.
- Command: {command}
- CLS attention (layer 3, mean over heads) on object patches: {test['cls_attention_on_objects']:.2f} of its mass
  (objects are ~6% of the patches).

## Accuracy on the test split (seed {test.get('seed', 0)}, {test['n']} items, all 576 visual tokens)

Overall {test['accuracy']:.3f}.

| kind | accuracy | prior (most frequent answer) |
| --- | --- | --- |
{rows}

## Validation during training (the last run; 100 items, 20 per kind)

| minute | visual tokens | overall | {' | '.join(data.KINDS)} |
| --- | --- | --- | {' | '.join('---' for _ in data.KINDS)} |
{evals}
"""
    tmp = model_dir / "README.md.tmp"
    tmp.write_text(text)
    tmp.rename(model_dir / "README.md")


# ---------------------------------------------------------------- main


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward, each parameter group's gradient clipped to norm 1 on its own (its losses do not mix), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for g in opt.param_groups:
        torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
    opt.step()


def lr_at(frac: float, peak: float, warm: float = 0.03) -> float:
    if frac < warm:
        return peak * frac / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def train(
    out: Path, minutes: float, seed: int, vision_share: float, batch: int, turns: int, eval_n: int,
    eval_every: float, log_path: Path | None, init: Path | None = None, vision_aux: bool = True,
    pooled_share: float = 0.4, grounding: bool = True, drop_share: float = 0.7,
) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = tokenizer_mod.build()
    image_id = tok.convert_tokens_to_ids(tokenizer_mod.IMAGE_TOKEN)
    cfg = model_config(len(tok), image_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    # --init: continue from a checkpoint (fresh auxiliary heads; scenes the first run has not seen)
    model = LlavaForConditionalGeneration.from_pretrained(init) if init else LlavaForConditionalGeneration(cfg)
    heads = AuxHeads(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)
    batcher = Batcher(tok, seed, turns)
    batcher.index = 10_000_000 if init else 0
    log = open(log_path, "a") if log_path else None
    history: list[dict] = []
    t0 = time.time()
    budget = minutes * 60

    def record(entry: dict) -> None:
        entry["minutes"] = round((time.time() - t0) / 60, 2)
        history.append(entry)
        if log:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    # ---- stage A: vision tower alone
    vision_budget = budget * vision_share
    params_a = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params_a, lr=1e-3, weight_decay=0.01)
    step = 0
    bar = tqdm(total=int(budget), desc="stage A (vision)", unit="s", mininterval=5.0,
               bar_format="{l_bar}{bar}| {n}/{total}s {postfix}")  # fmt: skip
    while time.time() - t0 < vision_budget:
        frac = (time.time() - t0) / vision_budget
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, 1e-3)
        scenes = batcher.scenes(batch, Curriculum(1, data.MAX_OBJECTS, None))
        loss, parts = vision_loss(model, heads, pixel_values([s.image for s in scenes]), dense_targets(scenes))
        optimizer_step(opt, loss)
        step += 1
        bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in parts.items()), refresh=False)
        bar.update(int(time.time() - t0) - bar.n)
        if step % 25 == 0:
            record({"stage": "A", "step": step, **parts})
    with torch.no_grad():
        model.eval()
        share = []
        for i in range(64):
            s = data.make_sample("val", seed, i)
            a = cls_attention(model.model.vision_tower, pixel_values([s.image]))[0]
            share.append(float(a[torch.from_numpy(s.patch_labels.reshape(-1) > 0)].sum()))
        model.train()
    record({"stage": "A-end", "step": step, "cls_attention_on_objects": float(np.mean(share))})
    bar.write(f"stage A done after {step} steps: CLS attention on objects (layer 3) = {np.mean(share):.3f}")
    if vision_budget > 0:
        save_checkpoint(model, out.with_name(out.name + ".stageA"), {"minutes": (time.time() - t0) / 60})

    # ---- stage B: projector + language model, curriculum over visual tokens and scenes. The vision
    # tower gets no gradient from the answers (as in LLaVA); with --vision-aux it keeps learning from
    # its own labels (detached from the language model, at a lower learning rate).
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(vision_aux)
    if grounding:  # attention probabilities are needed: eager attention in the language model only
        model.model.language_model.set_attn_implementation("eager")
    params_b = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
    params_b += list(model.lm_head.parameters())
    groups = [{"params": params_b, "peak": 5e-4 if init else 1e-3}]  # a checkpoint to continue: gentler
    groups.append({"params": list(heads.parameters()), "peak": 1e-3})
    if vision_aux:
        groups.append({"params": list(model.model.vision_tower.parameters()), "peak": 3e-4})
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    phases = [  # (share of stage B, curriculum, batch multiplier)
        (pooled_share * 0.7, Curriculum(4, 3, ["medium", "large"]), 2),
        (pooled_share * 0.3, Curriculum(2, data.MAX_OBJECTS, None), 1),
        (1.0 - pooled_share, Curriculum(1, data.MAX_OBJECTS, None), 1),
    ]
    tb0, tb = time.time(), budget - (time.time() - t0)
    last_eval, last_save = time.time(), time.time()
    bstep = 0
    while time.time() - tb0 < tb:
        frac = (time.time() - tb0) / tb
        acc, phase = 0.0, phases[-1]
        for ph in phases:
            acc += ph[0]
            if frac < acc:
                phase = ph
                break
        share_, cur, mult = phase
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, g["peak"])
        scenes = batcher.scenes(batch * mult, cur)
        n_image = (data.GRID // cur.pool) ** 2
        keeps = keep_objects(scenes, rng) if cur.pool == 1 and rng.random() < drop_share else None
        if keeps is not None:
            n_image = len(keeps[0])
        ids, targets, weights, mask, position, ground = batcher.text_batch(scenes, n_image, rng, keeps)
        px = pixel_values([s.image for s in scenes])
        if vision_aux:  # the tower keeps learning from its labels on (at most) `batch` images
            k = min(len(scenes), batch)
            hs = model.model.vision_tower(px[:k], output_hidden_states=True).hidden_states
            aux, aux_parts = vision_loss(model, heads, None, dense_targets(scenes[:k]), hs)
            feats = hs[model.config.vision_feature_layer][:, 1:].detach()  # [k, 576, Dv]
            if k < len(scenes):
                feats = torch.cat([feats, vision_features(model, px[k:])])
        else:
            feats = vision_features(model, px)
        if keeps is not None:
            feats = torch.stack([f[torch.from_numpy(k)] for f, k in zip(feats, keeps)])  # [B, K, Dv]
        img = project(model, feats, cur.pool)
        loss, parts = text_loss(model, ids, targets, weights, mask, position, img, image_id,
                                ground if grounding else None, heads)  # fmt: skip
        if vision_aux:
            loss = loss + aux  # separate parameters: the two losses do not mix
            parts.update(shape=aux_parts["shape"], summary=aux_parts["summary"], cls=aux_parts["cls"])
        optimizer_step(opt, loss)
        bstep += 1
        bar.set_description(f"stage B (tokens {n_image})")
        bar.set_postfix_str(" ".join(f"{k}={v:.3f}" for k, v in parts.items()), refresh=False)
        bar.update(int(time.time() - t0) - bar.n)
        if bstep % 25 == 0:
            record({"stage": "B", "step": bstep, "tokens": n_image, **parts})
        if time.time() - last_eval > eval_every * 60:
            ev = evaluate(model, tok, "val", seed, eval_n, cur.pool, image_id)
            record({"stage": "B-eval", "step": bstep, "tokens": n_image, **ev})
            bar.write(f"[{(time.time() - t0) / 60:.1f} min, tokens {n_image}] val {json.dumps(ev)}")
            last_eval = time.time()
        if time.time() - last_save > 10 * 60:
            save_checkpoint(model, out, {"minutes": (time.time() - t0) / 60, "history": history})
            last_save = time.time()
    bar.close()
    model.model.language_model.set_attn_implementation("sdpa")
    final = evaluate(model, tok, "val", seed, eval_n, 1, image_id)
    record({"stage": "final-val", "step": bstep, **final})
    training = {"minutes": (time.time() - t0) / 60, "seed": seed, "threads": torch.get_num_threads(),
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "history": history}  # fmt: skip
    save_checkpoint(model, out, training)
    test = {**evaluate(model, tok, "test", 0, 250, 1, image_id), "seed": 0}
    write_model_card(out, test, training, f"`vtprune train --minutes {minutes:g} --seed {seed}` "
                     f"({training['minutes']:.0f} minutes wall clock on a 2-core machine).")  # fmt: skip
    if log:
        log.close()
    return {"out": str(out), "minutes": round(training["minutes"], 1), "val": final, "test": test}


def main(args) -> dict:
    """`vtprune train`: train the embedded model (or fine-tune one with the pruner in the loop)."""
    if args.finetune_pruned:
        return finetune_main(args)
    minutes = 120.0 if args.minutes is None else args.minutes
    if minutes <= 0:
        raise UserError("--minutes", f"expected a positive number of minutes, got {minutes}")
    if not 0.0 <= args.pooled_share <= 1.0:
        raise UserError("--pooled-share", f"expected a number in [0, 1], got {args.pooled_share}")
    if not 0.0 <= args.drop_share <= 1.0:
        raise UserError("--drop-share", f"expected a number in [0, 1], got {args.drop_share}")
    if args.threads < 1:
        raise UserError("--threads", f"expected an integer >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else EMBEDDED_DIR
    log = Path(args.log) if args.log else None
    init = Path(args.init) if args.init else None
    if init is not None and not (init / "config.json").exists():
        raise UserError("--init", f"{init} is not a llava-hf checkpoint folder (no config.json)")
    return train(out, minutes, args.seed, args.vision_share, args.batch_size, args.turns, args.eval_n,
                 args.eval_every, log, init, not args.freeze_vision, args.pooled_share,
                 not args.no_grounding, args.drop_share)  # fmt: skip


def finetune_main(args) -> dict:
    """`vtprune train --finetune-pruned --out DIR [--init DIR]`: the paper's pruning-aware mode."""
    from vtprune.models.embedded.finetune import finetune

    if not args.out:
        raise UserError("--out", "--finetune-pruned needs a folder for the fine-tuned checkpoint")
    init = Path(args.init) if args.init else EMBEDDED_DIR
    if not (init / "config.json").exists():
        raise UserError("--init", f"{init} is not a llava-hf checkpoint folder (no config.json)")
    if not 0.0 < args.alpha <= 1.0:
        raise UserError("--alpha", f"expected a number in (0, 1], got {args.alpha}")
    minutes = 15.0 if args.minutes is None else args.minutes
    if minutes <= 0:
        raise UserError("--minutes", f"expected a positive number of minutes, got {minutes}")
    torch.set_num_threads(max(1, args.threads))
    return finetune(init, Path(args.out), minutes, args.seed, args.alpha, args.batch_size, args.turns,
                    Path(args.log) if args.log else None)

