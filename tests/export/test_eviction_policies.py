"""Stage 2's eviction policies: ai.vtprune::KVEvict of each policy in ONNX Runtime against the NumPy reference and
the PyTorch reference (`models.pruning.keep_index` through `evict`), on hand-made caches and random ones.

Under `vfloor` the graph's cache marks image tokens by a negative score (magnitude = the H2O score); the PyTorch
reference keeps a separate bool mask. The tests feed both encodings of the same cache."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from vtprune.export.eviction_op import DOMAIN, NAME, evict_reference, kv_evict_model
from vtprune.models.config import POLICIES, floor_slots
from vtprune.models.pruning import evict, keep_index


@lru_cache(maxsize=None)
def session(policy: str, share: float = 0.0, dtype: int = TensorProto.FLOAT) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = kv_evict_model(dtype, policy=policy, visual_floor=share)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_op(policy, key, value, score, heavy, recent, share=0.0, dtype=TensorProto.FLOAT):
    feed = dict(key=key, value=value, score=score, heavy=np.array(heavy, np.int64), recent=np.array(recent, np.int64))
    return session(policy, share, dtype).run(None, feed)


def positional(score: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """key[..., p, 0] = p, so the kept positions can be read back."""
    B, H, P = score.shape
    key = rng.standard_normal((B, H, P, 3)).astype(score.dtype)
    key[..., 0] = np.arange(P, dtype=score.dtype)
    return key, rng.standard_normal((B, H, P, 3)).astype(score.dtype)


def kept_positions(policy, score, heavy, recent, visual=None, share=0.0) -> list[int]:
    """One row through the ONNX op; returns the kept positions."""
    signed = np.where(visual, -score, score).astype(np.float32) if visual is not None else score
    key, value = positional(signed[None, None], np.random.default_rng(0))
    k, _, s = run_op(policy, key, value, signed[None, None], heavy, recent, share)
    kept = k[0, 0, :, 0].astype(int).tolist()
    np.testing.assert_array_equal(s[0, 0], signed[kept])  # the score (and its sign) travels with its entry
    return kept


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_one_function_of_standard_ops(policy):
    for dtype in (TensorProto.FLOAT, TensorProto.FLOAT16):
        model = kv_evict_model(dtype, policy=policy, visual_floor=0.25)
        onnx.checker.check_model(model, full_check=True)
        assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, NAME)]
        assert {n.domain for n in model.functions[0].node} == {""}
        assert policy in model.functions[0].doc_string


def test_hand_computed_keep_sets():
    score = np.array([5, 1, 5, 3, 2, 9, 0.5, 4], np.float32)  # positions 0..7
    # h2o and snapkv (same keep rule): the 2 newest (6, 7) + the 3 best older: 5 (pos 5), then the two 5s (0, 2).
    assert kept_positions("h2o", score, 3, 2) == [0, 2, 5, 6, 7]
    assert kept_positions("snapkv", score, 3, 2) == [0, 2, 5, 6, 7]
    # tova: no recent window, the 5 best of all: 9, 5, 5, 4, 3 -> positions 5, 0, 2, 7, 3.
    assert kept_positions("tova", score, 3, 2) == [0, 2, 3, 5, 7]
    # vfloor, image tokens at 1, 3, 4, 6; budget 5, share 0.4 -> floor 2, recent min(2, 5 - 2) = 2 (6, 7).
    # Older image tokens 1, 3, 4 score 1, 3, 2: the floor keeps 3 and 4; the last slot goes to the best rest, 5.
    visual = np.array([0, 1, 0, 1, 1, 0, 1, 0], bool)
    assert kept_positions("vfloor", score, 3, 2, visual, 0.4) == [3, 4, 5, 6, 7]
    # share 0.8 -> floor 4: the recent window shrinks to 1 (7), so 6 is older too, and the floor takes all
    # four image tokens 1, 3, 4, 6; nothing is left for the best text token (5).
    assert kept_positions("vfloor", score, 3, 2, visual, 0.8) == [1, 3, 4, 6, 7]
    # share 1.0 -> floor 5 > the 4 image tokens: no recent window, the slot the floor cannot fill goes to 5.
    assert kept_positions("vfloor", score, 3, 2, visual, 1.0) == [1, 3, 4, 5, 6]
    # share 0: exactly h2o.
    assert kept_positions("vfloor", score, 3, 2, visual, 0.0) == [0, 2, 5, 6, 7]
    # A budget covering the cache keeps everything, whatever the policy.
    for policy in POLICIES:
        assert kept_positions(policy, score, 5, 3, visual if policy == "vfloor" else None, 0.5) == list(range(8))


def test_floor_rounds_in_float32_in_both_references():
    # 0.3 * 5 is 1.4999999999999998 in float64 but 1.5000001 in float32: the graph's arithmetic decides.
    assert floor_slots(2, 3, 0.3) == 2
    score = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
    visual = np.array([1, 1, 0, 0, 0, 0, 0], bool)
    got = kept_positions("vfloor", score, 2, 3, visual, 0.3)  # floor 2: both image tokens, recent 3
    want = keep_index(torch.from_numpy(score), 2, 3, "vfloor", torch.from_numpy(visual), floor_slots(2, 3, 0.3))
    assert got == want.tolist() == [0, 1, 4, 5, 6]


@st.composite
def caches(draw):
    B, H, P = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(0, 60))
    heavy, recent = draw(st.integers(0, 50)), draw(st.integers(0, 50))
    levels = draw(st.sampled_from([1, 2, 4, 1000]))  # few levels = many ties
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    score = ((rng.integers(0, levels, (B, H, P)) + 1) / levels).astype(np.float32)  # > 0, so the sign is the flag
    visual = rng.random((B, H, P)) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    share = draw(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 1.0]))
    return score, visual, heavy, recent, share, rng


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=80, deadline=None)
@given(cache=caches())
def test_onnx_numpy_and_pytorch_agree(policy, cache):
    score, visual, heavy, recent, share, rng = cache
    signed = np.where(visual, -score, score).astype(np.float32) if policy == "vfloor" else score
    key, value = positional(signed, rng)
    got = run_op(policy, key, value, signed, heavy, recent, share)
    want = evict_reference(key, value, signed, heavy, recent, policy, share)
    for name, g, w in zip(("key", "value", "score"), got, want):
        assert g.shape == w.shape, f"{policy} {name}: {g.shape} != {w.shape}"
        np.testing.assert_array_equal(g, w, err_msg=f"{policy} {name}")
    t = [torch.from_numpy(x) for x in (key, value, score, visual)]
    k, v, s, _, vis = evict(t[0], t[1], t[2], heavy, recent, None, policy, t[3], floor_slots(heavy, recent, share))
    np.testing.assert_array_equal(got[0], k.numpy())
    np.testing.assert_array_equal(got[1], v.numpy())
    np.testing.assert_array_equal(np.abs(got[2]), s.numpy())
    np.testing.assert_array_equal(got[2] < 0 if policy == "vfloor" else vis.numpy(), vis.numpy())
    K = min(score.shape[-1], heavy + recent)
    assert got[0].shape[2] == K
    if policy == "vfloor" and score.shape[-1] > heavy + recent:  # the floor is met wherever the image tokens allow
        floor = min(floor_slots(heavy, recent, share), K)
        r = min(recent, K - floor)
        older_visual = visual[..., : score.shape[-1] - r].sum(-1)
        assert ((got[2] < 0).sum(-1) >= np.minimum(older_visual, floor)).all()


def test_vfloor_float16_cache():
    rng = np.random.default_rng(4)
    score = (rng.integers(1, 6, (2, 3, 40)) / 4).astype(np.float16)
    signed = np.where(rng.random((2, 3, 40)) < 0.5, -score, score).astype(np.float16)
    key, value = positional(signed, rng)
    got = run_op("vfloor", key, value, signed, 9, 6, 0.5, dtype=TensorProto.FLOAT16)
    for g, w in zip(got, evict_reference(key, value, signed, 9, 6, "vfloor", 0.5)):
        np.testing.assert_array_equal(g, w)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        kv_evict_model(policy="lru")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        keep_index(torch.ones(1, 5), 1, 1, "lru")
