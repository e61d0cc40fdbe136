"""The ONNX function ai.vtprune::KVEvict in ONNX Runtime against its NumPy reference, hand-made cases,
H2O properties checked from first principles, and the PyTorch eviction of the reference model."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from vtprune.export.eviction_op import (
    DOMAIN,
    NAME,
    add_kv_evict,
    evict_reference,
    kv_evict_function,
    kv_evict_model,
    kv_evict_node,
)
from vtprune.models.pruning import evict


@lru_cache(maxsize=None)
def session(dtype: int = TensorProto.FLOAT) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(kv_evict_model(dtype).SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_op(key, value, score, heavy, recent, dtype=TensorProto.FLOAT):
    feed = dict(key=key, value=value, score=score, heavy=np.array(heavy, np.int64), recent=np.array(recent, np.int64))
    return session(dtype).run(None, feed)


def positional_cache(B, H, P, Dh, rng, score):
    """key[..., p, 0] = p so that the kept positions can be read back from the output."""
    key = rng.standard_normal((B, H, P, Dh)).astype(score.dtype)
    key[..., 0] = np.arange(P, dtype=score.dtype)
    value = rng.standard_normal((B, H, P, Dh)).astype(score.dtype)
    return key, value


def assert_same(got, want):
    for name, g, w in zip(("key", "value", "score"), got, want):
        assert g.shape == w.shape, f"{name}: shape {g.shape} != reference {w.shape}"
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_model_passes_the_full_checker_and_declares_the_domain():
    for dtype in (TensorProto.FLOAT, TensorProto.FLOAT16):
        model = kv_evict_model(dtype)
        onnx.checker.check_model(model, full_check=True)
        assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), (DOMAIN, 1)}
        assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, NAME)]
        assert model.graph.node[0].domain == DOMAIN and model.graph.node[0].op_type == NAME
        assert all(n.op_type != NAME for n in model.functions[0].node)  # standard ops only
        assert {n.domain for n in model.functions[0].node} == {""}


def test_function_follows_the_model_opset_and_is_added_once():
    def info(name, dims, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, dims)

    cache, capped = ["B", "H", "P", "Dh"], ["B", "H", "K", "Dh"]
    layers = [  # two layers sharing one budget, like the decoder graph
        kv_evict_node(["k", "v", "s", "h", "r"], [f"k{i}", f"v{i}", f"s{i}"], name=f"/lm/layers.{i}/KVEvict")
        for i in range(2)
    ]
    inputs = [info("k", cache), info("v", cache), info("s", cache[:3])]
    inputs += [info("h", [], TensorProto.INT64), info("r", [], TensorProto.INT64)]
    outputs = [info(f"{n}{i}", capped if n != "s" else capped[:3]) for i in range(2) for n in "kvs"]
    model = helper.make_model(
        helper.make_graph(layers, "two_layers", inputs, outputs), opset_imports=[helper.make_opsetid("", 20)]
    )
    add_kv_evict(add_kv_evict(model))
    onnx.checker.check_model(model, full_check=True)
    assert len(model.functions) == 1 and [o.version for o in model.functions[0].opset_import if o.domain == ""] == [20]
    assert sum(o.domain == DOMAIN for o in model.opset_import) == 1
    rng = np.random.default_rng(3)
    key, score = rng.standard_normal((1, 2, 9, 4)).astype(np.float32), rng.random((1, 2, 9)).astype(np.float32)
    feed = dict(k=key, v=-key, s=score, h=np.array(3), r=np.array(2))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert_same(got[3:], evict_reference(key, -key, score, 3, 2))
    with pytest.raises(ValueError, match="opset >= 18"):
        kv_evict_function(17)


def test_hand_computed_keep_sets():
    # older positions 0..4 score 5, 1, 5, 3, 2; position 5 is recent. heavy 2: the two 5s (positions 0, 2).
    score = np.array([[[5, 1, 5, 3, 2, 9]]], np.float32)
    key, value = positional_cache(1, 1, 6, 2, np.random.default_rng(0), score)
    cases = {
        (2, 1): [0, 2, 5],
        (1, 1): [0, 5],  # tie between 0 and 2: the lower position wins
        (3, 0): [0, 2, 5],  # recent 0: position 5 competes as a heavy hitter, and has the best score
        (2, 2): [0, 2, 4, 5],
        (0, 2): [4, 5],
        (0, 0): [],
        (3, 3): [0, 1, 2, 3, 4, 5],  # budget == P: everything
        (9, 9): [0, 1, 2, 3, 4, 5],
    }
    for (heavy, recent), kept in cases.items():
        k, v, s = run_op(key, value, score, heavy, recent)
        assert k[0, 0, :, 0].tolist() == kept, (heavy, recent)
        assert s[0, 0].tolist() == score[0, 0, kept].tolist()
        np.testing.assert_array_equal(v, value[:, :, kept])


def test_all_tied_keeps_the_lowest_older_positions():
    score = np.ones((2, 3, 700), np.float32)  # a long axis, every score tied
    key, value = positional_cache(2, 3, 700, 4, np.random.default_rng(1), score)
    k, _, _ = run_op(key, value, score, 100, 50)
    expected = list(range(100)) + list(range(650, 700))
    assert (k[..., 0] == np.array(expected, np.float32)).all()


@pytest.mark.parametrize(
    "shape, heavy, recent",
    [
        ((1, 1, 8, 4), 3, 2),
        ((2, 4, 33, 8), 10, 6),
        ((2, 4, 33, 8), 0, 6),
        ((2, 4, 33, 8), 10, 0),
        ((2, 4, 33, 8), 0, 0),
        ((2, 4, 33, 8), 20, 13),  # budget == P
        ((2, 4, 33, 8), 40, 40),  # budget > P
        ((2, 4, 33, 8), 0, 40),  # recent alone covers the cache
        ((1, 8, 1025, 16), 512, 256),  # long axis (other TopK code paths)
        ((3, 2, 0, 4), 2, 1),  # empty cache
    ],
)
@pytest.mark.parametrize("tie_levels", [None, 3])
def test_matches_reference_on_random_caches(shape, heavy, recent, tie_levels):
    rng = np.random.default_rng(hash((shape, heavy, recent)) % 2**32)
    B, H, P, Dh = shape
    score = rng.random((B, H, P)) if tie_levels is None else rng.integers(0, tie_levels, (B, H, P))
    score = score.astype(np.float32)
    key = rng.standard_normal(shape).astype(np.float32)
    value = rng.standard_normal(shape).astype(np.float32)
    assert_same(run_op(key, value, score, heavy, recent), evict_reference(key, value, score, heavy, recent))


def test_float16_cache():
    rng = np.random.default_rng(2)
    score = rng.integers(0, 5, (2, 3, 40)).astype(np.float16)
    key = rng.standard_normal((2, 3, 40, 8)).astype(np.float16)
    got = run_op(key, key * 2, score, 9, 4, dtype=TensorProto.FLOAT16)
    assert_same(got, evict_reference(key, key * 2, score, 9, 4))


def test_negative_budgets():
    score = np.arange(6, dtype=np.float32).reshape(1, 1, 6)
    key = np.zeros((1, 1, 6, 2), np.float32)
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        evict_reference(key, key, score, -1, 2)
    assert_same(run_op(key, key, score, -1, 2), evict_reference(key, key, score, 0, 2))  # the graph clamps at 0


@pytest.mark.parametrize("policy", ["h2o", "tova", "vfloor"])  # snapkv shares h2o's body
@pytest.mark.parametrize("P, heavy, recent", [(30, 6, 4), (30, 20, 10), (30, 40, 40), (0, 3, 2)])
def test_one_call_over_several_layers_equals_one_call_per_layer(policy, P, heavy, recent):
    """The decoder's single KVEvict over all layers (rows ranked together) keeps what a per-layer call keeps:
    layers with different scores, many ties, budgets below, at and above P, an empty cache."""
    layers, (B, H, Dh) = 3, (2, 4, 5)
    rng = np.random.default_rng(P + heavy)
    feed, want = {}, []
    for i in range(layers):
        score = (rng.integers(0, 4, (B, H, P)) / 4 + 0.25).astype(np.float32)  # few levels: ties everywhere
        if policy == "vfloor":
            score *= np.where(rng.random((B, H, P)) < 0.4, -1, 1).astype(np.float32)  # image tokens: negative
        key, value = positional_cache(B, H, P, Dh, rng, score)
        feed.update({f"key.{i}": key, f"value.{i}": value, f"score.{i}": score})
        want += evict_reference(key, value, score, heavy, recent, policy, 0.25 if policy == "vfloor" else 0.0)
    names = [f"{n}.{i}" for i in range(layers) for n in ("key", "value", "score")]
    outs = [f"{n}_out.{i}" for i in range(layers) for n in ("key", "value", "score")]

    def info(name, length):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "H", length, "Dh"][: 3 if "score" in name else 4])

    inputs = [info(n, "P") for n in names] + [helper.make_tensor_value_info(n, TensorProto.INT64, []) for n in ("h", "r")]
    graph = helper.make_graph([kv_evict_node(names + ["h", "r"], outs, "/lm/KVEvict")], "all_layers", inputs,
                              [info(n, "K") for n in outs])
    model = add_kv_evict(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]), policy,
                         0.25 if policy == "vfloor" else 0.0, layers=layers)
    onnx.checker.check_model(model, full_check=True)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {**feed, "h": np.array(heavy), "r": np.array(recent)})
    for i in range(layers):
        assert_same(got[3 * i : 3 * i + 3], want[3 * i : 3 * i + 3])


@st.composite
def caches(draw):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    P, Dh = draw(st.integers(1, 80)), draw(st.integers(1, 6))
    heavy, recent = draw(st.integers(0, 90)), draw(st.integers(0, 90))
    levels = draw(st.sampled_from([1, 2, 4, 1000]))  # few levels = many ties
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    score = (rng.integers(0, levels, (B, H, P)) / levels).astype(np.float32)
    key, value = positional_cache(B, H, P, Dh, rng, score)
    return key, value, score, heavy, recent


@settings(max_examples=150, deadline=None)
@given(caches())
def test_properties(cache):
    key, value, score, heavy, recent = cache
    k, v, s = run_op(key, value, score, heavy, recent)
    assert_same((k, v, s), evict_reference(key, value, score, heavy, recent))
    P = score.shape[-1]
    K = min(P, heavy + recent)
    assert k.shape[2] == v.shape[2] == s.shape[2] == K  # never above the budget, never below it
    recent_kept = min(recent, P)
    for b in range(score.shape[0]):
        for h in range(score.shape[1]):
            kept = k[b, h, :, 0].astype(np.int64)
            assert (np.diff(kept) > 0).all()  # original order, no repeats
            assert set(range(P - recent_kept, P)) <= set(kept.tolist())  # the newest always kept
            np.testing.assert_array_equal(s[b, h], score[b, h, kept])
            np.testing.assert_array_equal(v[b, h], value[b, h, kept])
            older = P - recent_kept
            heavy_kept = kept[kept < older]
            dropped = np.setdiff1d(np.arange(older), heavy_kept)
            assert len(heavy_kept) == min(heavy, older)
            if len(heavy_kept) and len(dropped):  # heavy = the top scores, ties to the lower position
                worst_kept = score[b, h, heavy_kept].min()
                assert score[b, h, dropped].max() <= worst_kept
                tied_dropped = dropped[score[b, h, dropped] == worst_kept]
                tied_kept = heavy_kept[score[b, h, heavy_kept] == worst_kept]
                assert len(tied_dropped) == 0 or tied_dropped.min() > tied_kept.max()


@settings(max_examples=60, deadline=None)
@given(caches())
def test_matches_the_pytorch_eviction(cache):
    key, value, score, heavy, recent = cache
    want = evict(torch.from_numpy(key), torch.from_numpy(value), torch.from_numpy(score), heavy, recent)[:3]
    assert_same(run_op(key, value, score, heavy, recent), [t.numpy() for t in want])
