"""How to export a graph whose output length k is computed from the data (Stage 1), with torch.export.

Learned on torch 2.13.0, onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0 (probe: `DynamicKToy` below and
`vtprune.models.pruning.select_visual_tokens`, both checked in tests/export/test_dynamic_k.py):

What works (`torch.onnx.export(..., dynamo=True)`):
- Plain eager code: `k = int(t)` or `t.item()`, then `order[:, :k]`. torch.export turns k into an unbacked
  SymInt (u0); the ONNX graph gets a Slice with a computed end and an output axis named "u0", and one graph
  gives every input its own k. No torch.cond, no `dynamic_shapes` for k (the input can stay static: n = 576).
  `torch._check(k >= 1)` / `torch._check(k <= n)` are optional here (Slice clamps; the checks become runtime
  asserts that the exporter drops); add them where later code must know 1 <= k <= n to avoid guard errors.
- `torch.topk(scores, k_tensor)` with a 0-d tensor k, or a rank mask + `torch.nonzero` (kept positions come
  out ascending, in spatial order): both give the same graph behaviour, no Python int needed.
- The layers after the gather (LayerNorm, attention on CLS + k tokens, MLP, projector) export and run
  with the unbacked length; outputs matched eager PyTorch to 1e-6 on 20 inputs with k from 2 to 9.
- A dynamic n needs `Dim("n", min=3)`: the split-point code guards n >= 3 (Dim min=2 is refused).

What does not:
- `torch.sort(..., stable=True)` / `torch.argsort(..., stable=True)` (the reference's stable order) export
  to `aten.sort.stable`, which torchlib does not translate ("No ONNX function found"). Fix without touching
  the reference: `custom_translation_table=CUSTOM_TRANSLATIONS` (below: one TopK over the whole axis, which
  the ONNX spec and ORT order by index on ties, i.e. stable). With it, `select_visual_tokens` exports as is
  and matches the reference exactly, ties and flat curves included. Plain `torch.sort` (not stable) maps to
  TopK already.
- `dynamo=False` (TorchScript tracer): `int(t)` / `.item()` bake the traced k into the graph as a constant
  (only a TracerWarning; ORT then returns k=3 for every input), `torch._check` fails ("cond must be a bool"),
  and stable sort fails ("Sort, Out parameter is not supported"). `torch.topk(scores, k_tensor)` and
  `nonzero` do stay dynamic there; the torch.export path needs no such care.
- Batches: k differs per image, so every pattern here is for batch 1 (the reference refuses B > 1).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op


def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """ONNX translation of `aten::sort.stable`: TopK over the whole axis (ties in index order, i.e. stable)."""
    n = op.Shape(self, start=-1) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)  # [1]
    values, indices = op.TopK(self, n, axis=dim, largest=int(descending), sorted=1)
    return values, indices


CUSTOM_TRANSLATIONS = {torch.ops.aten.sort.stable: sort_stable}  # torch.onnx.export(custom_translation_table=...)


def split_point(sorted_desc: torch.Tensor) -> torch.Tensor:
    """i* of each descending curve [B, n] -> [B] (1-based), n for a flat curve (paper Eq. 3; as in models/pruning)."""
    n = sorted_desc.shape[-1]
    d1, dn = sorted_desc[..., :1], sorted_desc[..., -1:]  # [B, 1]
    c = d1 - dn
    i = torch.arange(1, n, dtype=sorted_desc.dtype)  # [n-1]
    f = (n - i) * (d1 - sorted_desc[..., : n - 1]) / torch.where(c > 0, c, torch.ones_like(c))  # [B, n-1]
    i_star = torch.argmax(f, dim=-1) + 1
    return torch.where(c[..., 0] > 0, i_star, torch.full_like(i_star, n))


class DynamicKToy(torch.nn.Module):
    """Per-token scores -> keep the k = clamp(i*, k_min, n) best tokens in spatial order: the Stage-1 pattern.

    x [1, n, D] -> (tokens [1, k, D], kept_index [1, k]); k is data-dependent.
    """

    def __init__(self, dim: int, k_min: int = 1):
        super().__init__()
        self.score = torch.nn.Linear(dim, 1)
        self.k_min = k_min

    def forward(self, x: torch.Tensor):
        scores = self.score(x)[..., 0]  # [1, n]
        n = scores.shape[-1]
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # [1, n] (CUSTOM_TRANSLATIONS)
        sorted_desc = torch.gather(scores, -1, order)  # [1, n]
        k = int(split_point(sorted_desc)[0].clamp(min=min(self.k_min, n), max=n))  # unbacked SymInt in torch.export
        torch._check(k >= 1)
        torch._check(k <= n)
        kept_index = torch.sort(order[:, :k], dim=-1).values  # [1, k], spatial order
        tokens = torch.gather(x, 1, kept_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [1, k, D]
        return tokens, kept_index


def export_dynamic_k(module: torch.nn.Module, example: torch.Tensor, path: str, dynamic_n: bool = False) -> None:
    """Export `module` (x -> (tokens, kept_index)) with torch.export; the output axis k stays dynamic."""
    dynamic = {"x": {1: torch.export.Dim("n", min=3)}} if dynamic_n else None
    torch.onnx.export(
        module.eval(), (example,), path, dynamo=True, input_names=["x"], output_names=["tokens", "kept_index"],
        dynamic_shapes=dynamic, custom_translation_table=CUSTOM_TRANSLATIONS, verbose=False,
    )
