"""`ai.vtprune::LongTailSplit`: Stage 1's keep-set as an ONNX model-local function of standard ops.

It mirrors `vtprune.models.pruning.select_visual_tokens`: sort the CLS scores (TopK, ties to the lower
index), i* = argmax_{i in [1, n-1]} (n - i)(d_1 - d_i)/(d_1 - d_n) (ArgMax keeps the first maximum),
a flat curve keeps all n, k = clamp(i*, k_min, n), and the k best indices come back in spatial order.
Written by hand because k is data-dependent: the graph computes it, so one graph gives each image its own k.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.vtprune"
OPSET = 20


def _const(name: str, value, dtype=TensorProto.INT64) -> onnx.NodeProto:
    dims = [] if not isinstance(value, list) else [len(value)]
    vals = value if isinstance(value, list) else [value]
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def long_tail_split_function(opset: int = OPSET) -> onnx.FunctionProto:
    """(scores [1, n] float, k_min [] int64) -> kept_index [1, k] int64, ascending. `opset`: the model's (a
    function must import the standard domain at the version its model does)."""
    n = [
        _const("zero", 0), _const("one", 1), _const("axis1", [1]), _const("zero1", [0]), _const("one1", [1]),
        _const("onef", 1.0, TensorProto.FLOAT), _const("zerof", 0.0, TensorProto.FLOAT),
        helper.make_node("Shape", ["scores"], ["n1"], start=1, end=2),  # [1]
        helper.make_node("Squeeze", ["n1"], ["n"]),  # []
        helper.make_node("TopK", ["scores", "n1"], ["d", "order"], axis=1, largest=1, sorted=1),  # [1, n] each
        helper.make_node("Slice", ["d", "zero1", "one1", "axis1"], ["d1"]),  # [1, 1]
        helper.make_node("Sub", ["n1", "one1"], ["nm1"]),  # [1] = n - 1
        helper.make_node("Slice", ["d", "nm1", "n1", "axis1"], ["dn"]),  # [1, 1]
        helper.make_node("Slice", ["d", "zero1", "nm1", "axis1"], ["di"]),  # [1, n-1] = d_1 .. d_{n-1}
        helper.make_node("Sub", ["d1", "dn"], ["c"]),  # [1, 1]
        helper.make_node("Greater", ["c", "zerof"], ["sloped"]),  # [1, 1]
        helper.make_node("Where", ["sloped", "c", "onef"], ["c_safe"]),
        helper.make_node("Range", ["one", "n", "one"], ["i"]),  # [n-1] = 1 .. n-1
        helper.make_node("Sub", ["n", "i"], ["tail_count"]),
        helper.make_node("Cast", ["tail_count"], ["tail_count_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["d1", "di"], ["drop"]),  # [1, n-1]
        helper.make_node("Mul", ["tail_count_f", "drop"], ["f_num"]),
        helper.make_node("Div", ["f_num", "c_safe"], ["f"]),  # [1, n-1]
        helper.make_node("ArgMax", ["f"], ["i_star0"], axis=1, keepdims=0),  # [1], first maximum
        helper.make_node("Add", ["i_star0", "one"], ["i_star"]),
        helper.make_node("Squeeze", ["sloped", "axis1"], ["sloped1"]),  # [1]
        helper.make_node("Where", ["sloped1", "i_star", "n1"], ["k_raw"]),  # flat curve: keep all
        helper.make_node("Min", ["k_min", "n"], ["lo"]),
        helper.make_node("Max", ["k_raw", "lo"], ["k_lo"]),
        helper.make_node("Min", ["k_lo", "n1"], ["k"]),  # [1]
        helper.make_node("Slice", ["order", "zero1", "k", "axis1"], ["head"]),  # [1, k], by score
        helper.make_node("TopK", ["head", "k"], ["kept_index", "unused_positions"], axis=1, largest=0, sorted=1),
    ]
    return helper.make_function(
        DOMAIN, "LongTailSplit", ["scores", "k_min"], ["kept_index"], n,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string="Stage 1 of vtprune: the long-tail split of CLS attention (paper Eq. 2-3), kept indices in spatial order.",
    )
