"""One torch.export-ed graph gives each input its own data-dependent k (the Stage-1 export pattern)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vtprune.export.dynamic_k import CUSTOM_TRANSLATIONS, DynamicKToy, export_dynamic_k
from vtprune.models.pruning import select_visual_tokens


def long_tail_tokens(seed: int, n: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, dim, generator=g) * (1 + 4 * torch.rand(1, n, 1, generator=g) ** (seed % 5 + 1))


@pytest.mark.parametrize("dynamic_n", [False, True])
def test_one_graph_many_k(tmp_path, dynamic_n):
    torch.manual_seed(0)
    toy = DynamicKToy(dim=8).eval()
    path = str(tmp_path / "toy.onnx")
    export_dynamic_k(toy, long_tail_tokens(0, 32, 8), path, dynamic_n=dynamic_n)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    k_dim = model.graph.output[1].type.tensor_type.shape.dim[1]
    assert k_dim.dim_param and not k_dim.HasField("dim_value")  # a symbolic output axis, not a baked constant
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ks = []
    for seed in range(12):
        n = 32 if not dynamic_n or seed % 2 else 45
        x = long_tail_tokens(seed, n, 8)
        with torch.no_grad():
            want_tokens, want_index = toy(x)
        tokens, index = session.run(None, {"x": x.numpy()})
        np.testing.assert_array_equal(index, want_index.numpy())
        np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=1e-6)
        ks.append(index.shape[1])
    assert len(set(ks)) >= 3, ks


def test_the_reference_stage1_exports_with_the_stable_sort_translation(tmp_path):
    class Stage1(torch.nn.Module):
        def forward(self, scores):  # [1, n] -> [1, k]
            return select_visual_tokens(scores, k_min=2)

    path = str(tmp_path / "stage1.onnx")
    torch.onnx.export(
        Stage1().eval(), (torch.rand(1, 64) ** 6,), path, dynamo=True, input_names=["scores"], output_names=["kept_index"],
        dynamic_shapes={"scores": {1: torch.export.Dim("n", min=3)}}, custom_translation_table=CUSTOM_TRANSLATIONS,
        verbose=False,
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cases = [(rng.random((1, n)) ** p).astype(np.float32) for n, p in [(576, 8), (576, 2), (100, 12), (7, 3)]]
    cases += [np.round(cases[0] * 8) / 8, np.full((1, 50), 0.02, np.float32)]  # many ties; a flat curve keeps all
    ks = []
    for scores in cases:
        got = session.run(None, {"scores": scores})[0]
        want = select_visual_tokens(torch.from_numpy(scores), k_min=2).numpy()
        assert got.shape == want.shape and (got == want).all()
        ks.append(got.shape[1])
    assert ks[-1] == 50 and len(set(ks)) >= 4, ks
