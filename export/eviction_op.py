"""The H2O KV-cache eviction as an ONNX model-local function `ai.vtprune::KVEvict`, and its NumPy reference.

The decoder graph calls one KVEvict node for all its layers (`layers`: the layers' rows are ranked together,
since the rule works row by row); the function body is made of standard ONNX ops, so ONNX Runtime (which
inlines model-local functions) runs it on any execution provider with no plugin.
It mirrors `vtprune.models.pruning.evict` (one layer's signature):

    key/value [B, H, P, Dh], score [B, H, P], heavy, recent (int64 scalars: budgets are graph inputs)
    -> key/value [B, H, K, Dh], score [B, H, K] with K = min(P, heavy + recent):
       the `recent` newest positions plus, among the P - recent older ones, the `heavy` best-scored,
       ties to the lower position (a stable sort), kept positions in their original order.
       P <= heavy + recent keeps everything (the outputs equal the inputs).

Ties. The ONNX spec asks TopK to break ties towards the lower index, and ONNX Runtime's CPU kernel does,
but its CUDA radix path (long axes) picks tied elements at the threshold in thread-stripe order (read in
onnxruntime's topk_impl.cuh, not run here), and TensorRT promises nothing. So the body never relies on TopK's tie order:
  1. the heavy threshold v* = the h-th largest older score (TopK *values* only, ties irrelevant);
  2. keep = recent | score > v* | (score == v* and the running count of v*-ties <= the quota left),
     which is exactly "the first h of a stable descending sort" (CumSum gives the ties' ranks);
  3. the kept positions in ascending order come from TopK(smallest K) on the key p + P * (not kept),
     whose values are all distinct, so TopK's tie rule never matters there either.
Scores must be finite (they are sums of softmax probabilities); the body clamps negative budgets at 0.

Policies (`vtprune.models.pruning.keep_index`; an export-time choice, recorded in the manifest's prune config):
`h2o` and `snapkv` share the body above (they differ in the scores the dense graph accumulates); `tova` is
the same body with the whole budget ranked (recent 0, heavy = heavy + recent); `vfloor` reserves
round(share * budget) slots for image tokens, which its cache marks by a negative score (the magnitude is the
H2O score): the recent window shrinks to min(recent, budget - floor), then per row the best min(floor, image
tokens older than the window) image tokens, then the best of the rest, each by the same threshold-and-quota
rule with per-row quotas (the quota-th value read from a sorted TopK with GatherElements).
Shapes: the function body uses no fixed shapes, so B, H, P, Dh and the budgets are all dynamic, and one
function serves fp32 and fp16 caches alike.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from vtprune.models.config import POLICIES, floor_slots  # torch-free

DOMAIN = "ai.vtprune"
DOMAIN_VERSION = 1
NAME = "KVEvict"
INPUTS = ("key", "value", "score", "heavy", "recent")
OUTPUTS = ("key_out", "value_out", "score_out")
MIN_OPSET = 18  # Shape(start, end), CastLike, ReduceSum with axes as an input




def evict_reference(key: np.ndarray, value: np.ndarray, score: np.ndarray, heavy: int, recent: int,
                    policy: str = "h2o", visual_floor: float = 0.0):  # fmt: skip
    """NumPy oracle of KVEvict: key/value [B, H, P, Dh], score [B, H, P] -> the same with P <= heavy + recent.
    Under `vfloor` a negative score marks an image token (its magnitude is the score)."""
    heavy, recent = int(heavy), int(recent)
    if heavy < 0 or recent < 0:
        raise ValueError(f"budgets must be >= 0, got heavy={heavy}, recent={recent}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if score.shape[-1] <= heavy + recent:
        return key, value, score
    idx = keep_reference(score, heavy, recent, policy, visual_floor)  # [B, H, K]
    kv_idx = idx[..., None]  # [B, H, K, 1]
    return (
        np.take_along_axis(key, kv_idx, axis=2),
        np.take_along_axis(value, kv_idx, axis=2),
        np.take_along_axis(score, idx, axis=2),
    )


def keep_reference(score: np.ndarray, heavy: int, recent: int, policy: str = "h2o", visual_floor: float = 0.0) -> np.ndarray:
    """NumPy oracle of the keep-set: score [..., P] with P > heavy + recent >= 0 -> index [..., heavy + recent],
    ascending; ties to the lower position."""
    P = score.shape[-1]
    if policy == "tova":
        heavy, recent = heavy + recent, 0
    if policy == "vfloor":
        return _floor_keep_reference(np.abs(score), score < 0, heavy, recent, floor_slots(heavy, recent, visual_floor))
    older = P - recent
    order = np.argsort(-score[..., :older], axis=-1, kind="stable")  # [..., older], best first
    heavy_idx = np.sort(order[..., :heavy], axis=-1)  # [..., heavy]
    recent_idx = np.broadcast_to(np.arange(older, P), (*score.shape[:-1], recent))  # [..., recent]
    return np.concatenate([heavy_idx, recent_idx], axis=-1)  # [..., K]


def _floor_keep_reference(score: np.ndarray, visual: np.ndarray, heavy: int, recent: int, floor: int) -> np.ndarray:
    """vfloor's keep-set (budget < P), row by row: score, visual [..., P] -> index [..., heavy + recent]."""
    P, budget = score.shape[-1], heavy + recent
    floor = min(floor, budget)
    r = min(recent, budget - floor)
    older = P - r
    flat_s, flat_v = score.reshape(-1, P), visual.reshape(-1, P)
    rows = []
    for s, v in zip(flat_s, flat_v):
        order = np.argsort(-s[:older], kind="stable")  # best first, ties to the lower position
        picked = [p for p in order if v[p]][:floor]
        rest = [p for p in order if p not in set(picked)][: budget - r - len(picked)]
        rows.append(sorted(picked + rest) + list(range(older, P)))
    return np.array(rows, dtype=np.int64).reshape(*score.shape[:-1], budget)


def _builder():
    """(nodes, node, const): a node list and two appenders, each node named after its first output."""
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))

    def const(name: str, values: list, dtype: int = TensorProto.INT64, dims: list[int] | None = None) -> None:
        dims = [len(values)] if dims is None else dims
        node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))

    return nodes, node, const


def keep_index_nodes(opset: int = MIN_OPSET, index: bool = True) -> list[onnx.NodeProto]:
    """Nodes computing the H2O keep-set along the last axis of any-rank `score`.

    Inputs score [..., P], heavy, recent (int64, [] or [1]) -> `kept` [..., P] bool and (unless `index` is off)
    `index` [..., min(P, heavy + recent)], ascending. Shared by KVEvict and any other function with the same keep
    rule (the prefill selection, KVUpdate); node names are prefixed by the function name at use. The intermediate
    value names (P, K, pos, threshold, ...) are taken in the calling function's scope.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"KVEvict needs ONNX opset >= {MIN_OPSET}, got {opset}")
    nodes, node, const = _builder()

    const("zero", [0]), const("one", [1]), const("last", [-1]), const("int_max", [2**62])
    const("zero_scalar", [0], dims=[]), const("one_scalar", [1], dims=[])
    const("neg_inf_f", [-np.inf], TensorProto.FLOAT, dims=[])
    # Sizes and budgets, all as [1] int64.
    node("Shape", ["score"], ["P"], start=-1)  # [1]
    node("Reshape", ["heavy", "last"], ["heavy_1"])
    node("Reshape", ["recent", "last"], ["recent_1"])
    node("Max", ["heavy_1", "zero"], ["heavy_0"])
    node("Max", ["recent_1", "zero"], ["recent_0"])
    node("Add", ["heavy_0", "recent_0"], ["budget"])
    node("Min", ["budget", "P"], ["K"])  # kept positions
    node("Min", ["recent_0", "P"], ["r"])  # recent positions kept
    node("Sub", ["K", "r"], ["h"])  # heavy positions kept, <= P - r
    node("Sub", ["P", "r"], ["older"])  # first recent position
    # Positions [P] and the recent mask [P].
    node("Squeeze", ["P", "zero"], ["P_scalar"])
    node("Range", ["zero_scalar", "P_scalar", "one_scalar"], ["pos"])  # [P]
    node("GreaterOrEqual", ["pos", "older"], ["is_recent"])  # [P]
    # 1. The heavy threshold: the h-th largest older score (values only; tie order is irrelevant).
    node("CastLike", ["neg_inf_f", "score"], ["neg_inf"])
    node("Where", ["is_recent", "neg_inf", "score"], ["older_score"])  # [..., P], recent -> -inf
    node("Max", ["h", "one"], ["h_1"])
    node("Min", ["h_1", "P"], ["k_top"])  # >= 1 unless P == 0
    node("TopK", ["older_score", "k_top"], ["top_values", "top_unused"], axis=-1, largest=1, sorted=1)
    node("Slice", ["top_values", "last", "int_max", "last"], ["threshold"])  # [..., 1] (h = 0: the max)
    # 2. Keep-mask: everything above the threshold, then the first ties at the threshold up to the quota.
    node("Greater", ["older_score", "threshold"], ["above"])  # [..., P]
    node("Cast", ["above"], ["above_i"], to=TensorProto.INT64)
    node("ReduceSum", ["above_i", "last"], ["n_above"], keepdims=1)  # [..., 1]
    node("Sub", ["h", "n_above"], ["quota"])  # [..., 1]; 0 when h = 0
    node("Equal", ["older_score", "threshold"], ["tied"])  # [..., P]
    node("Cast", ["tied"], ["tied_i"], to=TensorProto.INT64)
    node("CumSum", ["tied_i", "last"], ["tie_rank"])  # [..., P], 1-based among the ties
    node("LessOrEqual", ["tie_rank", "quota"], ["within_quota"])
    node("And", ["tied", "within_quota"], ["tied_kept"])
    node("Or", ["above", "tied_kept"], ["heavy_kept"])
    node("Or", ["heavy_kept", "is_recent"], ["kept"])  # [..., P], K true per row
    if not index:
        return nodes
    # 3. Kept positions in ascending order: smallest K of a key with distinct values.
    node("Not", ["kept"], ["dropped"])
    node("Cast", ["dropped"], ["dropped_i"], to=TensorProto.INT64)
    node("Mul", ["dropped_i", "P"], ["dropped_offset"])
    node("Add", ["pos", "dropped_offset"], ["order_key"])  # [..., P]
    node("TopK", ["order_key", "K"], ["order_unused", "index"], axis=-1, largest=0, sorted=1)  # [..., K]
    return nodes


def _top_quota_nodes(node, tag: str, masked: str, quota: str, k: str) -> None:
    """Nodes marking, per row, the first `quota` entries of a stable descending sort of `masked` [..., P]
    (excluded entries hold -inf): `{tag}_kept` [..., P] bool. quota [..., 1] int64 varies per row, at most
    k ([1], >= 1 unless P = 0) and at most the row's finite entries; the quota-th value is read from TopK's
    sorted values, the ties at it are taken in position order (CumSum), as in `keep_index_nodes`."""
    node("TopK", [masked, k], [f"{tag}_top", f"{tag}_top_unused"], axis=-1, largest=1, sorted=1)  # [..., k]
    node("Concat", [f"{tag}_top", "neg_inf_col"], [f"{tag}_top_pad"], axis=-1)  # [..., k + 1]: never empty (P = 0)
    node("Sub", [quota, "one"], [f"{tag}_q1"])
    node("Max", [f"{tag}_q1", "zero"], [f"{tag}_at"])  # [..., 1]; quota 0 reads the max and keeps nothing
    node("GatherElements", [f"{tag}_top_pad", f"{tag}_at"], [f"{tag}_threshold"], axis=-1)  # [..., 1]
    node("Greater", [masked, f"{tag}_threshold"], [f"{tag}_above"])
    node("Cast", [f"{tag}_above"], [f"{tag}_above_i"], to=TensorProto.INT64)
    node("ReduceSum", [f"{tag}_above_i", "last"], [f"{tag}_n_above"], keepdims=1)
    node("Sub", [quota, f"{tag}_n_above"], [f"{tag}_ties_left"])
    node("Equal", [masked, f"{tag}_threshold"], [f"{tag}_tied"])
    node("Cast", [f"{tag}_tied"], [f"{tag}_tied_i"], to=TensorProto.INT64)
    node("CumSum", [f"{tag}_tied_i", "last"], [f"{tag}_tie_rank"])
    node("LessOrEqual", [f"{tag}_tie_rank", f"{tag}_ties_left"], [f"{tag}_within"])
    node("And", [f"{tag}_tied", f"{tag}_within"], [f"{tag}_tied_kept"])
    node("Or", [f"{tag}_above", f"{tag}_tied_kept"], [f"{tag}_kept"])


def floor_keep_index_nodes(share: float) -> list[onnx.NodeProto]:
    """vfloor's keep-set: inputs score [..., P] (negative = image token), heavy, recent -> `index`
    [..., min(P, heavy + recent)] ascending, with round(share * budget) slots reserved for image tokens."""
    nodes, node, const = _builder()

    const("zero", [0]), const("one", [1]), const("last", [-1])
    const("zero_scalar", [0], dims=[]), const("one_scalar", [1], dims=[])
    const("neg_inf_f", [-np.inf], TensorProto.FLOAT, dims=[]), const("zero_f", [0.0], TensorProto.FLOAT, dims=[])
    const("share", [float(share)], TensorProto.FLOAT), const("half", [0.5], TensorProto.FLOAT)
    node("Shape", ["score"], ["P"], start=-1)  # [1]
    node("Reshape", ["heavy", "last"], ["heavy_1"])
    node("Reshape", ["recent", "last"], ["recent_1"])
    node("Max", ["heavy_1", "zero"], ["heavy_0"])
    node("Max", ["recent_1", "zero"], ["recent_0"])
    node("Add", ["heavy_0", "recent_0"], ["budget"])
    node("Min", ["budget", "P"], ["K"])
    # The floor: round(share * budget), half up, at most the budget; the recent window gives way to it.
    node("Cast", ["budget"], ["budget_f"], to=TensorProto.FLOAT)
    node("Mul", ["budget_f", "share"], ["floor_raw"])
    node("Add", ["floor_raw", "half"], ["floor_half"])
    node("Floor", ["floor_half"], ["floor_f"])
    node("Cast", ["floor_f"], ["floor_i"], to=TensorProto.INT64)
    node("Min", ["floor_i", "budget"], ["floor"])
    node("Sub", ["budget", "floor"], ["room"])
    node("Min", ["recent_0", "room"], ["r_budget"])
    node("Min", ["r_budget", "P"], ["r"])
    node("Sub", ["P", "r"], ["older"])
    node("Sub", ["K", "r"], ["h"])  # heavy slots, floor included
    node("Squeeze", ["P", "zero"], ["P_scalar"])
    node("Range", ["zero_scalar", "P_scalar", "one_scalar"], ["pos"])  # [P]
    node("GreaterOrEqual", ["pos", "older"], ["is_recent"])
    node("Not", ["is_recent"], ["is_older"])
    # Image tokens carry a negative score; rank by the magnitude.
    node("CastLike", ["zero_f", "score"], ["zero_s"])
    node("CastLike", ["neg_inf_f", "score"], ["neg_inf"])
    node("Less", ["score", "zero_s"], ["visual"])
    node("Abs", ["score"], ["magnitude"])
    node("And", ["visual", "is_older"], ["older_visual"])  # [..., P]
    node("Cast", ["older_visual"], ["older_visual_i"], to=TensorProto.INT64)
    node("ReduceSum", ["older_visual_i", "last"], ["n_visual"], keepdims=1)  # [..., 1]
    node("Min", ["n_visual", "floor"], ["f"])  # [..., 1] floor slots this row fills
    node("Where", ["older_visual", "magnitude", "neg_inf"], ["floor_score"])
    node("Shape", ["score"], ["rows"], start=0, end=-1)
    node("Concat", ["rows", "one"], ["col_shape"], axis=0)
    node("Expand", ["neg_inf", "col_shape"], ["neg_inf_col"])  # [..., 1]
    node("Min", ["floor", "P"], ["floor_p"])
    node("Max", ["floor_p", "one"], ["floor_k1"])
    node("Min", ["floor_k1", "P"], ["floor_k"])
    _top_quota_nodes(node, "fl", "floor_score", "f", "floor_k")  # -> fl_kept
    node("Not", ["fl_kept"], ["not_floor"])
    node("And", ["is_older", "not_floor"], ["rest_pool"])
    node("Where", ["rest_pool", "magnitude", "neg_inf"], ["rest_score"])
    node("Sub", ["h", "f"], ["rest_quota"])  # [..., 1]
    node("Max", ["h", "one"], ["h_1"])
    node("Min", ["h_1", "P"], ["rest_k"])
    _top_quota_nodes(node, "rs", "rest_score", "rest_quota", "rest_k")  # -> rs_kept
    node("Or", ["fl_kept", "rs_kept"], ["heavy_kept"])
    node("Or", ["heavy_kept", "is_recent"], ["kept"])
    node("Not", ["kept"], ["dropped"])
    node("Cast", ["dropped"], ["dropped_i"], to=TensorProto.INT64)
    node("Mul", ["dropped_i", "P"], ["dropped_offset"])
    node("Add", ["pos", "dropped_offset"], ["order_key"])
    node("TopK", ["order_key", "K"], ["order_unused", "index"], axis=-1, largest=0, sorted=1)  # [..., K]
    return nodes


def kv_evict_function(opset: int = MIN_OPSET, policy: str = "h2o", visual_floor: float = 0.0,
                      layers: int = 1) -> onnx.FunctionProto:  # fmt: skip
    """The FunctionProto `ai.vtprune::KVEvict` of one eviction policy, importing the standard domain at `opset`.

    layers > 1: one call evicts every layer's cache (inputs key.i, value.i, score.i per layer, then the budgets;
    outputs key_out.i, value_out.i, score_out.i). The keep rule works row by row, so the layers' score rows are
    joined along the head axis [B, layers * H, P] and ranked once: a decoder step runs one keep computation, not
    one per layer (the keep rule's ~40 nodes once, not once per layer), then one gather per cache tensor."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    budgets = ["heavy", "recent"]
    if policy == "tova":  # the whole budget ranked by the newest query's attention: recent 0
        budgets = ["budget_heavy", "budget_recent"]
        zero = helper.make_tensor("tova_zero", TensorProto.INT64, [], [0])
        keep = [
            helper.make_node("Constant", [], ["tova_zero"], value=zero),
            helper.make_node("Max", ["budget_heavy", "tova_zero"], ["tova_heavy"]),
            helper.make_node("Max", ["budget_recent", "tova_zero"], ["tova_recent"]),
            helper.make_node("Add", ["tova_heavy", "tova_recent"], ["heavy"]),
            helper.make_node("Identity", ["tova_zero"], ["recent"]),
        ] + keep_index_nodes(opset)
    elif policy == "vfloor":
        if opset < MIN_OPSET:
            raise ValueError(f"KVEvict needs ONNX opset >= {MIN_OPSET}, got {opset}")
        keep = floor_keep_index_nodes(visual_floor)
    else:
        keep = keep_index_nodes(opset)
    if layers == 1:
        inputs, outputs = ["key", "value", "score", *budgets], list(OUTPUTS)
        nodes = keep + [
            helper.make_node("GatherElements", ["score", "index"], ["score_out"], axis=-1),  # [B, H, K]
            helper.make_node("Unsqueeze", ["index", "last"], ["index_kv"]),  # [B, H, K, 1]
            helper.make_node("GatherND", ["key", "index_kv"], ["key_out"], batch_dims=2),  # [B, H, K, Dh]
            helper.make_node("GatherND", ["value", "index_kv"], ["value_out"], batch_dims=2),  # [B, H, K, Dh]
        ]
    else:
        per_layer = [[f"{n}.{i}" for n in ("key", "value", "score")] for i in range(layers)]
        inputs = [n for names in per_layer for n in names] + budgets
        outputs = [f"{n}.{i}" for i in range(layers) for n in OUTPUTS]
        nodes = [helper.make_node("Concat", [names[2] for names in per_layer], ["score"], axis=1)]  # [B, L*H, P]
        nodes += keep + [  # index [B, L*H, K]
            helper.make_node("GatherElements", ["score", "index"], ["score_kept"], axis=-1),  # [B, L*H, K]
            helper.make_node("Split", ["score_kept"], [f"score_out.{i}" for i in range(layers)], axis=1,
                             num_outputs=layers),  # [B, H, K] each
            helper.make_node("Unsqueeze", ["index", "last"], ["index_kv"]),  # [B, L*H, K, 1]
            helper.make_node("Split", ["index_kv"], [f"index_kv.{i}" for i in range(layers)], axis=1,
                             num_outputs=layers),  # [B, H, K, 1] each
        ]
        for i, (key, value, _) in enumerate(per_layer):
            nodes.append(helper.make_node("GatherND", [key, f"index_kv.{i}"], [f"key_out.{i}"], batch_dims=2))
            nodes.append(helper.make_node("GatherND", [value, f"index_kv.{i}"], [f"value_out.{i}"], batch_dims=2))
    for n in nodes:
        n.name = f"{NAME}/{n.output[0]}"
    return helper.make_function(
        DOMAIN,
        NAME,
        inputs,
        outputs,
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string=__doc__.split("\n\n")[0] + f" Policy: {policy}" + (f", floor {visual_floor}." if policy == "vfloor" else ".")
        + (f" All {layers} layers in one call." if layers > 1 else ""),
    )


def add_kv_evict(model: onnx.ModelProto, policy: str = "h2o", visual_floor: float = 0.0, layers: int = 1) -> onnx.ModelProto:
    """Add the KVEvict function of `policy` (over `layers` layers per call) and the `ai.vtprune` opset import to
    `model` (in place), matching its opset."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == NAME for f in model.functions):
        model.functions.append(kv_evict_function(opset, policy, visual_floor, layers))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def kv_evict_node(inputs: list[str], outputs: list[str], name: str) -> onnx.NodeProto:
    """One KVEvict call: inputs (key, value, score, heavy, recent) -> outputs (key, value, score)."""
    return helper.make_node(NAME, inputs, outputs, name=name, domain=DOMAIN)


def kv_evict_model(dtype: int = TensorProto.FLOAT, opset: int = MIN_OPSET, policy: str = "h2o",
                   visual_floor: float = 0.0) -> onnx.ModelProto:  # fmt: skip
    """A one-node model around KVEvict with fully dynamic shapes, for tests and for profiling the op alone."""
    dims = ["B", "H", "P", "Dh"]
    out_dims = ["B", "H", "K", "Dh"]
    graph = helper.make_graph(
        [kv_evict_node(list(INPUTS), list(OUTPUTS), name="evict")],
        "kv_evict",
        [
            helper.make_tensor_value_info("key", dtype, dims),
            helper.make_tensor_value_info("value", dtype, dims),
            helper.make_tensor_value_info("score", dtype, dims[:3]),
            helper.make_tensor_value_info("heavy", TensorProto.INT64, []),
            helper.make_tensor_value_info("recent", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("key_out", dtype, out_dims),
            helper.make_tensor_value_info("value_out", dtype, out_dims),
            helper.make_tensor_value_info("score_out", dtype, out_dims[:3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="vtprune")
    return add_kv_evict(model, policy, visual_floor)
