"""Training plumbing: targets line up with the next token, preprocessing matches CLIP's, checkpoints load."""

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

from vtprune.models.embedded import batches, data, losses, train
from vtprune.models.embedded import model as net
from vtprune.models.embedded import tokenizer as T


def test_targets_are_the_next_answer_tokens():
    tok = T.build()
    b = batches.Batcher(tok, seed=0, turns=6)
    scene = data.make_scene("train", 0, 0)
    chat = b.conversation(scene, 36, np.random.default_rng(0))
    ids, targets, weights = chat.ids, chat.targets, chat.weights
    assert ids.count(b.image_id) == 36
    pos = [i for i, t in enumerate(targets) if t != -100]
    assert all(targets[i] == ids[i + 1] for i in pos)
    qas = data.conversation(scene, np.random.default_rng(0), 6)
    expected = [t for q in qas for t in tok(q.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    assert [ids[i + 1] for i in pos] == expected
    lengths = [len(tok(q.answer, add_special_tokens=False).input_ids) + 1 for q in qas]
    assert sum(weights) == pytest.approx(sum(n**0.5 for n in lengths) / len(qas))  # a turn weighs sqrt(length)
    assert sum(ids[i + 1] == tok.eos_token_id for i in pos) == len(qas)


def test_pixel_values_match_clip_image_processor():
    image = data.make_scene("test", 0, 0).image
    ours = net.pixel_values([image])
    ref = torch.as_tensor(np.asarray(T.image_processor()(image, return_tensors="np").pixel_values))
    assert ours.shape == ref.shape == (1, 3, 336, 336)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())


def test_config_has_llava_15_geometry():
    tok = T.build()
    cfg = net.model_config(len(tok), 4, 0, 2, 3)
    v = cfg.vision_config
    assert (v.image_size // v.patch_size) ** 2 == 576
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu" and cfg.image_seq_length == 576


def test_checkpoint_round_trip(tmp_path):
    tok = T.build()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(net.model_config(len(tok), 4, 0, 2, 3)).eval()
    train.save_checkpoint(model, tmp_path / "ckpt")
    assert not list(tmp_path.glob("*.tmp-*"))
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "preprocessor_config.json" in names
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    px = net.pixel_values([data.make_scene("test", 0, 1).image])
    prompt = T.PROMPT.format(question="How many circles are there?").replace("<image>", "<image>" * 576)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=px).logits
        b = loaded(input_ids=ids, pixel_values=px).logits
        # the training path (features -> projector -> merge -> language model) is transformers' forward
        img = net.image_embeds(model, px, 1)
        h = model.model.language_model(inputs_embeds=net.merge(model, ids, img, 4)).last_hidden_state
        c = model.lm_head(h)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-5), float((a - c).abs().max())


def test_cls_attention_is_a_distribution():
    tok = T.build()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(net.model_config(len(tok), 4, 0, 2, 3)).eval()
    model.set_attn_implementation("eager")  # so that transformers returns the attention probabilities
    px = net.pixel_values([data.make_scene("test", 0, 2).image])
    with torch.no_grad():
        att = net.cls_attention(model.model.vision_tower, px)
        eager = model.model.vision_tower(px, output_attentions=True)
    assert att.shape == (1, 576)
    assert float(att.sum()) < 1.0  # the CLS key holds the rest
    ref = eager.attentions[2][:, :, 0, 1:].mean(1)  # layer 3 (1-based), CLS query, patch keys
    assert torch.allclose(att, ref, atol=1e-6), float((att - ref).abs().max())


def test_grounding_targets_mark_the_asked_objects():
    tok = T.build()
    b = batches.Batcher(tok, seed=0, turns=8)
    scenes = [data.make_scene("train", 0, i) for i in range(3)]
    ids, targets, weights, _, _, (answers, words, names, coords) = b.text_batch(scenes, 576, np.random.default_rng(3))
    rows, pos, heads, hit = answers
    assert len(rows) > 0 and hit.shape == (len(rows), 576)
    for r, p, h in zip(rows.tolist(), pos.tolist(), hit):
        assert targets[r, p] == ids[r, p + 1] and weights[r, p] > 0  # each grounded position predicts an answer word
        assert h.any() and (torch.from_numpy(scenes[r].patch_object.reshape(-1) > 0)[h]).all()
    # a position question: head 0 at the first object, head 1 at the second, from the same position
    twice = [(r, p) for r, p in set(zip(rows.tolist(), pos.tolist())) if ((rows == r) & (pos == p)).sum() == 2]
    assert twice
    for r, p in twice:
        sel = (rows == r) & (pos == p)
        assert sorted(heads[sel].tolist()) == [0, 1]
        assert not (hit[sel][0] & hit[sel][1]).any()
        assert tok.convert_ids_to_tokens(int(ids[r, p])) == ":"  # predicted after "ASSISTANT:"
    # a description: each item's words look at that item's object, whose colour is among the words
    described = 0
    for r, p, h in zip(rows.tolist(), pos.tolist(), hit):
        objs = set(scenes[r].patch_object.reshape(-1)[h.numpy()].tolist())
        assert len(objs) == 1 or tok.convert_ids_to_tokens(int(ids[r, p])) == ":"
        o = scenes[r].objects[objs.pop() - 1]
        if tok.convert_ids_to_tokens(int(ids[r, p + 1])) in data.COLOURS:
            described += 1
            assert tok.convert_ids_to_tokens(int(ids[r, p + 1])) == o.colour
    assert described > 0
    # a position question: layer 0 reads the first object's name with head 1, the second's with head 2
    rows_n, pos_n, heads_n, at = names
    assert len(rows_n) == 2 * len(twice) and sorted(set(heads_n.tolist())) == [1, 2]
    for r, p, head, a in zip(rows_n.tolist(), pos_n.tolist(), heads_n.tolist(), at):
        at_pos = a.nonzero().flatten().tolist()
        words_at = [tok.convert_ids_to_tokens(int(ids[r, j])) for j in at_pos]
        assert words_at[0] in data.COLOURS and words_at[1] in data.SHAPES
        relative = max(j for j in range(p) if tok.convert_ids_to_tokens(int(ids[r, j])) == "relative")
        assert (max(at_pos) < relative) if head == 1 else (relative < min(at_pos) < p)
    # each colour or shape word of a question points at the patches of that colour or shape
    assert len(words[0]) > 0
    for r, p, _, h in zip(*words):
        word = tok.convert_ids_to_tokens(int(ids[r, p]))
        dense = scenes[r].patch_targets()
        if word in data.COLOURS:
            expected = dense["colour"] == data.COLOUR_NAMES.index(word) + 1
        else:
            shape = {v: k for k, v in data.PLURAL.items()}.get(word, word)
            expected = dense["shape"] == data.SHAPES.index(shape) + 1
        assert torch.equal(h, torch.from_numpy(expected.reshape(-1)))
    # object centres: both objects of a position question where its answer is predicted, and each
    # description item's object along its words
    rows_c, pos_c, slot_c, xy = coords
    for r, p in twice:
        sel = (rows_c == r) & (pos_c == p)
        assert sorted(slot_c[sel].tolist()) == [0, 1]
    for r, p, xy_ in zip(rows_c.tolist(), pos_c.tolist(), xy):
        centres = [(o.cx / 336, o.cy / 336) for o in scenes[r].objects]
        assert min(abs(cx - float(xy_[0])) + abs(cy - float(xy_[1])) for cx, cy in centres) < 1e-6
        assert weights[r, p] > 0
    # pooled 4x4: a pooled token is marked when any of its 16 patches is
    *_, ((_, _, _, hit36), _, _, _) = b.text_batch(scenes[:1], 36, np.random.default_rng(3))
    assert hit36.shape[1] == 36


def test_grounding_loss_by_hand():
    a1 = torch.zeros(1, 2, 5, 5)  # B, H, S, S
    a1[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # head 0, query position 4
    ground = (torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), torch.tensor([[False, True, True]]))  # image tokens at 1..3
    loss = losses.grounding_loss((a1,), ground, first_image=1, n_image=3)
    assert float(loss) == pytest.approx(-np.log(0.3 + 0.4 + 1e-4), rel=1e-6)


def test_token_dropout_keeps_every_object_patch():
    tok = T.build()
    b = batches.Batcher(tok, seed=0, turns=8)
    scenes = [data.make_scene("train", 0, i) for i in range(6)]
    rng = np.random.default_rng(0)
    for _ in range(5):
        keeps = batches.keep_objects(scenes, rng)
        assert len({len(k) for k in keeps}) == 1  # one length per batch
        for s, k in zip(scenes, keeps):
            assert np.all(np.diff(k) > 0) and k.max() < 576  # spatial order, no repeats
            assert set(np.flatnonzero(s.patch_object.reshape(-1) > 0)) <= set(k.tolist())
    # grounding targets follow the kept patches
    ids, *_, ((rows, _, _, hit), _, _, _) = b.text_batch(scenes, len(keeps[0]), rng, keeps)
    assert (ids == b.image_id).sum(1).eq(len(keeps[0])).all()
    for r, h in zip(rows.tolist(), hit):
        assert (scenes[r].patch_object.reshape(-1)[keeps[r]][h.numpy()] > 0).all()


def test_turns_are_independent_single_turn_prompts():
    """In a packed chat each turn sees the prefix and itself at a single-turn prompt's positions: its
    hidden states equal those of the same question asked alone (how inference asks it)."""
    tok = T.build()
    b = batches.Batcher(tok, seed=0, turns=4)
    scene = data.make_scene("train", 0, 3)
    ids, targets, weights, mask, position, _ = b.text_batch([scene, data.make_scene("train", 0, 4)], 16, np.random.default_rng(1))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(net.model_config(len(tok), b.image_id, 0, 2, 3)).eval()
    lm = model.model.language_model
    lm.set_attn_implementation("eager")
    img = torch.randn(2, 16, lm.config.hidden_size)
    with torch.no_grad():
        packed = lm(inputs_embeds=net.merge(model, ids, img, b.image_id), attention_mask=mask,
                    position_ids=position).last_hidden_state[0]
        chat = b.conversation(scene, 16, np.random.default_rng(1))
        turns = torch.tensor(chat.turn)
        assert turns.max() >= 3
        prefix = int((turns == 0).sum())
        for t in range(1, int(turns.max()) + 1):
            at = (turns == t).nonzero().flatten()
            alone = torch.tensor([chat.ids[:prefix] + [chat.ids[i] for i in at]])
            ref = lm(inputs_embeds=net.merge(model, alone, img[:1], b.image_id)).last_hidden_state[0, prefix:]
            assert torch.allclose(packed[at], ref, atol=1e-4), (t, float((packed[at] - ref).abs().max()))


def test_coord_loss_by_hand():
    heads = net.AuxHeads(8, 6)
    hidden = torch.randn(1, 5, 6)
    coords = (torch.tensor([0, 0]), torch.tensor([2, 2]), torch.tensor([0, 1]), torch.tensor([[0.1, 0.2], [0.9, 0.5]]))
    with torch.no_grad():
        loss = float(losses.coord_loss(hidden, heads.coords, coords))
    assert loss == pytest.approx(10 * np.mean([0.16, 0.09, 0.16, 0.0]), rel=1e-5)
