"""Train the embedded LLaVA from scratch on the procedural question set (`vtprune train`).

Over 400 lines by a few: the training loop with its validation, checkpoint and model card, which it writes.

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

This file is the loop (stages A and B, validation, the checkpoint and its model card); the model's pieces are
in model.py, the batches and the curriculum in batches.py, the losses in losses.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from vtprune.errors import UserError
from vtprune.models.embedded import data
from vtprune.models.embedded import tokenizer as tokenizer_mod
from vtprune.models.embedded.batches import Batcher, Curriculum, dense_targets, keep_objects
from vtprune.models.embedded.losses import text_loss, vision_loss
from vtprune.models.embedded.model import (AuxHeads, cls_attention, image_embeds, merge, model_config, pixel_values, project,
                                           vision_features)
from vtprune.models.loading import default_model_dir

EMBEDDED_DIR = default_model_dir()  # the shipped checkpoint: only ever an --init, never an --out (check_output)


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

{tokenizer_mod.card_section()}
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
    if not args.out:  # the parser requires it; a direct caller too: the shipped checkpoint is never the default
        raise UserError("--out", "expected a new folder for the checkpoint (the shipped model is never overwritten)")
    out = Path(args.out)
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
