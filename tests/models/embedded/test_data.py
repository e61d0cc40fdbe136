"""The procedural question set: deterministic, splits apart, objects a minority, labels true to the pixels."""

import re
from collections import Counter

import numpy as np
import pytest

from vtprune.models.embedded import data


def _same_scene(a: data.Scene, b: data.Scene) -> bool:
    return (
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        and a.objects == b.objects
        and np.array_equal(a.patch_object, b.patch_object)
    )


def test_deterministic_per_seed():
    for i in range(3):
        assert _same_scene(data.make_scene("train", 5, i), data.make_scene("train", 5, i))
        a, b = data.make_sample("test", 3, i), data.make_sample("test", 3, i)
        assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    scene = data.make_scene("train", 0, 0)
    assert [q.question for q in data.conversation(scene, rng_a, 8)] == [
        q.question for q in data.conversation(scene, rng_b, 8)
    ]


def test_splits_and_seeds_differ():
    scenes = {(s, seed): data.make_scene(s, seed, 0) for s in data.SPLITS for seed in (0, 1)}
    keys = list(scenes)
    for i, k in enumerate(keys):
        for other in keys[i + 1 :]:
            assert not _same_scene(scenes[k], scenes[other]), (k, other)


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        data.make_scene("dev", 0, 0)


def test_objects_cover_a_minority_of_patches():
    shares = [(data.make_scene("train", 0, i).patch_object > 0).mean() for i in range(60)]
    assert max(shares) < 0.35
    assert 0.02 < np.mean(shares) < 0.2


def test_patch_labels_agree_with_drawn_pixels():
    """A patch labelled with object i is mostly that object's colour; a background patch mostly is not."""
    for index in range(8):
        scene = data.make_scene("val", 0, index)
        pixels = np.asarray(scene.image).astype(np.float32)  # [336, 336, 3]
        patches = pixels.reshape(24, 14, 24, 14, 3).transpose(0, 2, 1, 3, 4).reshape(24, 24, 196, 3)
        palette = np.array(list(data.COLOURS.values()), np.float32)  # [6, 3]
        near_any = (np.linalg.norm(patches[..., None, :] - palette, axis=-1) < 40).any(-1)  # [24, 24, 196]
        for r in range(24):
            for c in range(24):
                label = scene.patch_object[r, c]
                if label == 0:
                    assert near_any[r, c].mean() < 0.35, (index, r, c)
                else:
                    colour = np.array(data.COLOURS[scene.objects[label - 1].colour], np.float32)
                    close = np.linalg.norm(patches[r, c] - colour, axis=-1) < 40
                    assert close.mean() >= 0.29, (index, r, c)
        for i, o in enumerate(scene.objects):  # every object is labelled where its centre is
            assert scene.patch_object[int(o.cy // 14), int(o.cx // 14)] == i + 1



def test_dense_targets_name_each_patchs_object():
    """Every patch of object i carries i's colour, shape, size and region; background carries 0."""
    for index in range(6):
        scene = data.make_scene("val", 1, index)
        dense = scene.patch_targets()
        background = scene.patch_object == 0
        for key in ("colour", "shape", "size", "region"):
            assert (dense[key][background] == 0).all()
        for i, o in enumerate(scene.objects):
            mine = scene.patch_object == i + 1
            assert (dense["colour"][mine] == data.COLOUR_NAMES.index(o.colour) + 1).all()
            assert (dense["shape"][mine] == data.SHAPES.index(o.shape) + 1).all()
            assert (dense["size"][mine] == list(data.SIZES).index(o.size) + 1).all()
            assert (dense["region"][mine] == data.REGIONS.index(o.region) + 1).all()
        assert dense["centre"].sum() == len({(int(o.cy // 14), int(o.cx // 14)) for o in scene.objects})

def test_existence_negatives_are_balanced_and_absent():
    samples = [data.make_sample("train", 0, i, kind="exist") for i in range(240)]
    answers = Counter(s.answer for s in samples)
    assert answers["yes"] == answers["no"]  # evaluation items alternate
    first = [data.make_sample("val", 0, i) for i in range(0, 100, 5)]  # the exist items of a 100-item prefix
    assert Counter(s.answer for s in first) == {"yes": 10, "no": 10}
    drawn = [data.ask(data.make_scene("train", 0, i), "exist", np.random.default_rng(i)) for i in range(200)]
    assert 0.38 < sum(q.answer == "yes" for q in drawn) / len(drawn) < 0.62  # training draws them
    neg = [s for s in samples if s.answer == "no"]
    types = Counter(s.meta["neg_type"] for s in neg)
    assert set(types) == set(data.NEG_TYPES)
    assert all(0.25 < types[t] / len(neg) < 0.42 for t in data.NEG_TYPES), types
    for s in samples:
        colour, shape = re.match(r"Is there a (\w+) (\w+) in the image\?", s.question).groups()
        present = any(o.colour == colour and o.shape == shape for o in s.objects)
        assert present == (s.answer == "yes")
        if s.meta["neg_type"] == "adversarial":  # a near miss: shares a colour or a shape with the image
            assert any(o.colour == colour or o.shape == shape for o in s.objects)
        if s.meta["neg_type"] == "popular":
            combo = data.COLOUR_NAMES.index(colour) * len(data.SHAPES) + data.SHAPES.index(shape)
            assert data.PRIOR[combo] >= np.sort(data.PRIOR)[-8]


def test_answers_follow_the_objects():
    for i in range(100):
        s = data.make_sample("test", 1, i)
        if s.kind == "count":
            word = re.match(r"How many (\w+)", s.question).group(1)
            n = sum(o.colour == word or data.PLURAL[o.shape] == word for o in s.objects)
            assert s.answer == str(n)
        elif s.kind == "colour":
            shape = re.match(r"What colour is the (\w+)\?", s.question).group(1)
            assert [o.colour for o in s.objects if o.shape == shape] == [s.answer]
        elif s.kind == "position":
            a, b = re.match(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?", s.question).groups()
            oa, ob = (next(o for o in s.objects if o.name == n) for n in (a, b))
            expected = {"left": oa.cx < ob.cx, "right": oa.cx > ob.cx, "above": oa.cy < ob.cy, "below": oa.cy > ob.cy}
            assert expected[s.answer]
        elif s.kind == "describe":
            assert sorted(data.parse_description(s.answer)) == sorted(
                (o.size, o.colour, o.shape, o.region) for o in s.objects
            )


def test_kinds_cycle_so_any_prefix_is_balanced():
    assert [data.make_sample("val", 0, i).kind for i in range(10)] == data.KINDS * 2


def test_a_conversation_asks_each_question_once():
    rng = np.random.default_rng(0)
    for i in range(30):
        qas = data.conversation(data.make_scene("train", 0, i), rng, 8)
        assert len({q.question for q in qas}) == len(qas) and sum(q.kind == "describe" for q in qas) <= 1


def test_score():
    assert data.score("exist", "Yes.", "yes") == 1.0
    assert data.score("exist", "no", "yes") == 0.0
    assert data.score("count", "", "2") == 0.0
    gold = "There are 2 objects. A large red circle at the top left, a small blue cross at the centre."
    assert data.score("describe", gold, gold) == 1.0
    half = "There is 1 object. A large red circle at the top left."  # precision 1, recall 1/2
    assert data.score("describe", half, gold) == pytest.approx(2 / 3)
    assert data.score("describe", "nothing", gold) == 0.0
