"""vision.onnx against the PyTorch reference: same k and kept indices per image, embeddings within 1e-4."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from vtprune.export.split_op import DOMAIN, long_tail_split_function
from vtprune.export.vision import export_vision
from vtprune.models.loading import load_llava
from vtprune.models.pruning import select_visual_tokens
from vtprune.models.reference import PrunedLlava


@pytest.fixture(scope="module")
def split_session():
    node = helper.make_node("LongTailSplit", ["scores", "k_min"], ["kept_index"], domain=DOMAIN)
    graph = helper.make_graph(
        [node], "split",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "n"]), helper.make_tensor_value_info("k_min", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("kept_index", TensorProto.INT64, [1, "k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[long_tail_split_function()])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString())


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 600), st.integers(1, 12), st.integers(1, 64), st.sampled_from(["smooth", "ties", "flat"]), st.integers(0, 2**31))
def test_split_op_equals_the_reference(split_session, n, power, k_min, shape, seed):
    rng = np.random.default_rng(seed)
    scores = (rng.random((1, n)) ** power).astype(np.float32)
    if shape == "ties":
        scores = np.round(scores, 1)
    elif shape == "flat":
        scores[:] = 1.0 / n
    ours = split_session.run(None, {"scores": scores, "k_min": np.array(k_min)})[0]
    ref = select_visual_tokens(torch.from_numpy(scores), k_min).numpy()
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def test_one_vision_graph_gives_each_image_its_k(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir))
    proto = export_vision(model)
    onnx.checker.check_model(proto, full_check=True)
    assert any(f.domain == DOMAIN and f.name == "LongTailSplit" for f in proto.functions)
    session = ort.InferenceSession(proto.SerializeToString())
    ks = set()
    for seed in range(6):
        pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
        embeds, kept, scores = session.run(None, {"pixel_values": pixels.numpy(), "k_min": np.array(model.prune.k_min)})
        ref = model.encode_image(pixels)
        assert np.array_equal(kept, ref.kept_index.numpy()), f"image {seed}: kept indices differ"
        diff = np.abs(embeds - ref.embeds.numpy()).max()
        assert diff < 1e-4, f"image {seed}: embeddings differ by {diff:.2e}"
        assert np.abs(scores - ref.cls_scores.numpy()).max() < 1e-5
        ks.add(kept.shape[1])
    assert len(ks) > 1, "the graph gave every image the same k: k was baked in"
    # k_min is a graph input, not a constant a simplifier may fold: k_min = n keeps every patch (Stage 1 off)
    assert [i.name for i in proto.graph.input] == ["pixel_values", "k_min"]
    assert "k_min" not in {t.name for t in proto.graph.initializer}
    embeds, kept, _ = session.run(None, {"pixel_values": pixels.numpy(), "k_min": np.array(model.num_patches)})
    assert kept.shape[1] == model.num_patches
