"""`ai.vtprune::PrefillSelect`: Stage 2 at prefill as an ONNX model-local function of standard ops.

It mirrors `vtprune.models.pruning.prefill_select`: importance = column sums of the causal
softmax(E E^T / sqrt(D)) of the input embeddings; keep the `recent` last tokens plus the `heavy`
most important others (the cache eviction's rule, from the same nodes: `keep_index_nodes`), in
their original order, with their original position ids. When heavy + recent covers the new tokens
(every decode step, and prefill with the paper's 0.5 / 0.5 ratios) it keeps them all.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from vtprune.export.eviction_op import DOMAIN, keep_index_nodes

NAME = "PrefillSelect"


def prefill_select_function(opset: int) -> onnx.FunctionProto:
    """(inputs_embeds [B, S, D], position_ids [B, S], heavy, recent) -> the same two, S -> min(S, heavy + recent)."""

    def const(name, dtype, vals, dims):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))

    importance = [
        const("pf_axis1", TensorProto.INT64, [1], [1]),
        const("pf_axis_last", TensorProto.INT64, [-1], [1]),
        const("pf_one", TensorProto.FLOAT, [1.0], []),
        const("pf_neg_inf", TensorProto.FLOAT, [float("-inf")], []),
        helper.make_node("Shape", ["inputs_embeds"], ["pf_S"], start=1, end=2),  # [1]
        helper.make_node("Shape", ["inputs_embeds"], ["pf_D"], start=2, end=3),
        helper.make_node("Cast", ["pf_D"], ["pf_D_f"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["pf_D_f"], ["pf_sqrt_d"]),
        helper.make_node("Cast", ["inputs_embeds"], ["pf_E"], to=TensorProto.FLOAT),  # importance in fp32
        helper.make_node("Transpose", ["pf_E"], ["pf_Et"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["pf_E", "pf_Et"], ["pf_dots"]),  # [B, S, S]
        helper.make_node("Div", ["pf_dots", "pf_sqrt_d"], ["pf_sim"]),
        helper.make_node("Concat", ["pf_S", "pf_S"], ["pf_SS"], axis=0),
        helper.make_node("Expand", ["pf_one", "pf_SS"], ["pf_ones"]),  # [S, S]
        helper.make_node("Trilu", ["pf_ones"], ["pf_lower"], upper=0),
        helper.make_node("Cast", ["pf_lower"], ["pf_visible"], to=TensorProto.BOOL),
        helper.make_node("Where", ["pf_visible", "pf_sim", "pf_neg_inf"], ["pf_masked"]),
        helper.make_node("Softmax", ["pf_masked"], ["pf_probs"], axis=-1),
        helper.make_node("ReduceSum", ["pf_probs", "pf_axis1"], ["score"], keepdims=0),  # [B, S] column sums
    ]
    gather = [
        helper.make_node("GatherElements", ["position_ids", "index"], ["kept_position_ids_sel"], axis=1),  # [B, K]
        helper.make_node("Unsqueeze", ["index", "pf_axis_last"], ["pf_index_e"]),  # [B, K, 1]
        helper.make_node("GatherND", ["inputs_embeds", "pf_index_e"], ["kept_embeds_sel"], batch_dims=1),  # [B, K, D]
    ]
    select = importance + keep_index_nodes(opset) + gather
    for n in select:
        n.name = f"{NAME}/{n.output[0]}"
    # When heavy + recent covers the new tokens (every decode step; prefill at the paper's 0.5 / 0.5) nothing can be
    # dropped: the If passes both inputs through, and the S x S similarity is never computed.
    covers = [
        helper.make_node("Shape", ["inputs_embeds"], ["pf_new"], start=1, end=2),  # [1]
        helper.make_node("Max", ["heavy", "pf_zero"], ["pf_heavy0"]),
        helper.make_node("Max", ["recent", "pf_zero"], ["pf_recent0"]),
        helper.make_node("Add", ["pf_heavy0", "pf_recent0"], ["pf_budget"]),
        helper.make_node("LessOrEqual", ["pf_new", "pf_budget"], ["pf_covers_1"]),
        helper.make_node("Squeeze", ["pf_covers_1"], ["pf_covers"]),  # [] bool: If's condition
    ]
    untyped = onnx.TypeProto()
    keep_all = helper.make_graph(
        [helper.make_node("Identity", ["inputs_embeds"], ["pf_all_embeds"], name=f"{NAME}/keep_all/embeds"),
         helper.make_node("Identity", ["position_ids"], ["pf_all_positions"], name=f"{NAME}/keep_all/positions")],
        "keep_all", [], [helper.make_value_info("pf_all_embeds", untyped), helper.make_value_info("pf_all_positions", untyped)])
    selected = helper.make_graph(select, "select", [], [helper.make_value_info("kept_embeds_sel", untyped),
                                                       helper.make_value_info("kept_position_ids_sel", untyped)])
    nodes = [const("pf_zero", TensorProto.INT64, [0], []), *covers,
             helper.make_node("If", ["pf_covers"], ["kept_embeds", "kept_position_ids"], then_branch=keep_all,
                              else_branch=selected)]
    for n in nodes:
        n.name = n.name or f"{NAME}/{n.output[0]}"
    return helper.make_function(
        DOMAIN, NAME, ["inputs_embeds", "position_ids", "heavy", "recent"], ["kept_embeds", "kept_position_ids"],
        nodes, opset_imports=[helper.make_opsetid("", opset)],
        doc_string="Stage 2 of vtprune at prefill: H2O selection on the causal similarity of the input embeddings.",
    )


def add_prefill_select(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == NAME for f in model.functions):
        model.functions.append(prefill_select_function(opset))
    return model
