"""The ONNX function ai.vtprune::PrefillSelect (Stage 2 at prefill) in ONNX Runtime against the PyTorch
reference `vtprune.models.pruning.prefill_select`: hand-made ties, degenerate budgets, and random shapes.

The importance is a float sum computed by two libraries, so two near-equal importances may be ordered
differently by each; the random test therefore asks for the same keep-set except where the two
disagree on tokens whose importance lies within a tolerance of the heavy threshold (a near tie), and
exact ties (one-hot softmax rows: every importance exactly 1.0) must come out identical.
"""

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

from vtprune.export.eviction_op import DOMAIN, DOMAIN_VERSION
from vtprune.export.prefill_op import NAME, prefill_select_function
from vtprune.models.pruning import prefill_importance, prefill_select

OPSET = 20
TOL = 1e-4  # importance is a sum of at most S softmax probabilities, each computed in float32


def prefill_select_model(dtype: int = TensorProto.FLOAT, opset: int = OPSET) -> onnx.ModelProto:
    """One PrefillSelect node with fully dynamic shapes, as the decoder graph calls it."""
    node = helper.make_node(NAME, ["inputs_embeds", "position_ids", "heavy", "recent"],
                            ["kept_embeds", "kept_position_ids"], name="/lm/PrefillSelect", domain=DOMAIN)
    graph = helper.make_graph(
        [node], "prefill_select",
        [helper.make_tensor_value_info("inputs_embeds", dtype, ["B", "S", "D"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("heavy", TensorProto.INT64, []),
         helper.make_tensor_value_info("recent", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("kept_embeds", dtype, ["B", "K", "D"]),
         helper.make_tensor_value_info("kept_position_ids", TensorProto.INT64, ["B", "K"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    model.functions.append(prefill_select_function(opset))
    return model


@lru_cache(maxsize=None)
def session(dtype: int = TensorProto.FLOAT) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(prefill_select_model(dtype).SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_op(embeds: np.ndarray, heavy: int, recent: int, positions: np.ndarray | None = None, dtype=TensorProto.FLOAT):
    """-> (kept_embeds [B, K, D], kept index [B, K]) with positions = 3 * index + 7 unless given."""
    B, S, _ = embeds.shape
    if positions is None:
        positions = np.broadcast_to(3 * np.arange(S, dtype=np.int64) + 7, (B, S)).copy()
    feed = dict(inputs_embeds=embeds, position_ids=positions, heavy=np.array(heavy, np.int64), recent=np.array(recent, np.int64))
    kept_embeds, kept_positions = session(dtype).run(None, feed)
    return kept_embeds, (kept_positions - 7) // 3


def reference(embeds: np.ndarray, heavy: int, recent: int) -> np.ndarray:
    return prefill_select(torch.from_numpy(embeds.astype(np.float32)), heavy, recent).numpy()  # [B, K]


def test_model_passes_the_full_checker_with_standard_ops_only():
    model = prefill_select_model()
    onnx.checker.check_model(model, full_check=True)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, NAME)]
    assert {n.domain for n in model.functions[0].node} == {""}


def test_all_tied_keeps_the_lowest_older_positions():
    # e_r = 100 * one-hot(r): every softmax row is one-hot on the diagonal, so every importance is exactly 1.
    S = 12
    embeds = (100.0 * np.eye(S, 16, dtype=np.float32))[None]  # [1, S, 16]
    np.testing.assert_array_equal(prefill_importance(torch.from_numpy(embeds)).numpy(), np.ones((1, S), np.float32))
    for heavy, recent in [(3, 2), (1, 0), (0, 4), (5, 5), (11, 0)]:
        expected = list(range(heavy)) + list(range(S - recent, S))
        kept_embeds, index = run_op(embeds, heavy, recent)
        assert index[0].tolist() == expected, (heavy, recent)
        assert reference(embeds, heavy, recent)[0].tolist() == expected
        np.testing.assert_array_equal(kept_embeds, embeds[:, expected])


def test_hand_computed_importance_order():
    # Orthogonal tokens of different norms: token 0 (norm 3) draws all of row 0 and some of later rows.
    # Zero tokens 1..4 get the uniform share of rows they see; importance falls with position,
    # except token 0 which is highest. heavy 2, recent 1 of 6 -> {0, 1} + {5}.
    embeds = np.zeros((1, 6, 4), np.float32)
    embeds[0, 0, 0] = 3.0
    imp = prefill_importance(torch.from_numpy(embeds))[0].numpy()
    assert imp.argmax() == 0 and (np.diff(imp[1:]) < 0).all()
    _, index = run_op(embeds, 2, 1)
    assert index[0].tolist() == [0, 1, 5]


@pytest.mark.parametrize("heavy, recent", [(0, 0), (0, 1), (1, 0), (10, 0), (0, 10), (9, 1), (5, 5), (50, 50)])
def test_degenerate_budgets(heavy, recent):
    rng = np.random.default_rng(heavy * 100 + recent)
    embeds = rng.standard_normal((2, 10, 8)).astype(np.float32)
    kept_embeds, index = run_op(embeds, heavy, recent)
    K = min(10, heavy + recent)
    assert index.shape == (2, K) and kept_embeds.shape == (2, K, 8)
    np.testing.assert_array_equal(index, reference(embeds, heavy, recent))
    if heavy + recent >= 10:  # the budget covers the prompt: nothing dropped, in order (the paper's 0.5 / 0.5)
        np.testing.assert_array_equal(kept_embeds, embeds)


def test_negative_budgets_count_as_zero():
    embeds = np.random.default_rng(5).standard_normal((1, 9, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_op(embeds, -3, 2)[1], reference(embeds, 0, 2))
    np.testing.assert_array_equal(run_op(embeds, 4, -1)[1], reference(embeds, 4, 0))


def test_float16_embeddings_are_gathered_unchanged():
    rng = np.random.default_rng(6)
    embeds = rng.standard_normal((2, 20, 8)).astype(np.float16)
    kept_embeds, index = run_op(embeds, 4, 3, dtype=TensorProto.FLOAT16)
    assert kept_embeds.dtype == np.float16
    np.testing.assert_array_equal(kept_embeds, np.take_along_axis(embeds, index[..., None], axis=1))
    assert_near_same_keep_set(embeds.astype(np.float32), index, 4, 3)


def assert_near_same_keep_set(embeds: np.ndarray, index: np.ndarray, heavy: int, recent: int) -> None:
    """ONNX's keep-set equals torch's, except for swaps among tokens within TOL of the heavy threshold."""
    want = reference(embeds, heavy, recent)
    assert index.shape == want.shape
    if np.array_equal(index, want):
        return
    imp = prefill_importance(torch.from_numpy(embeds)).numpy()  # [B, S]
    S = embeds.shape[1]
    older = S - min(recent, S)
    h = index.shape[1] - min(recent, S)
    for b in range(embeds.shape[0]):
        got_set, want_set = set(index[b].tolist()), set(want[b].tolist())
        if got_set == want_set:
            continue
        threshold = np.sort(imp[b, :older])[::-1][h - 1]  # the h-th largest older importance
        differing = sorted(got_set ^ want_set)
        gaps = np.abs(imp[b, differing] - threshold)
        assert (gaps <= TOL).all(), f"row {b}: ONNX and torch disagree on {differing}, importance gaps {gaps} > {TOL}"


@st.composite
def prompts(draw):
    B, S, D = draw(st.integers(1, 3)), draw(st.integers(1, 60), label="S"), draw(st.integers(1, 16))
    heavy, recent = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    scale = draw(st.sampled_from([0.0, 0.01, 1.0, 30.0]))  # 0: no content; 30: one-hot rows, exact ties
    duplicates = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    embeds = (scale * rng.standard_normal((B, S, D))).astype(np.float32)
    if duplicates and S > 1:  # repeated tokens (a word said twice, a flat image region)
        src = rng.integers(0, S, S // 2)
        dst = rng.integers(0, S, S // 2)
        embeds[:, dst] = embeds[:, src]
    return embeds, heavy, recent


@settings(max_examples=150, deadline=None)
@given(prompts())
def test_matches_the_pytorch_prefill_selection(prompt):
    embeds, heavy, recent = prompt
    B, S, D = embeds.shape
    kept_embeds, index = run_op(embeds, heavy, recent)
    K = min(S, heavy + recent)
    assert index.shape == (B, K) and kept_embeds.shape == (B, K, D)  # never above the budget, never below it
    for b in range(B):
        assert (np.diff(index[b]) > 0).all()  # original order, no repeats
        assert set(range(S - min(recent, S), S)) <= set(index[b].tolist())  # the newest always kept
    np.testing.assert_array_equal(kept_embeds, np.take_along_axis(embeds, index[..., None], axis=1))
    assert_near_same_keep_set(embeds, index, heavy, recent)
