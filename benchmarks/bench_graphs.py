"""Graph edits the benchmark needs, on copies of a bundle's graphs (the bundle itself is never changed).

- `pin_k`: the vision graph with Stage 1's `LongTailSplit` replaced by a fixed top-k on the same CLS
  scores, so a random-weight model keeps exactly k patches (its split point means nothing). The
  graph's `k_min` input becomes that k; every other node, and so the compute, is the bundle's.
- `unpruned_vision`: the vision graph with k_min fixed at n (the split then keeps all n patches), one
  input `pixel_values` and one output `image_features [n, D]`: the peer's vision model.
- `embedding_model`: input_ids + image_features -> inputs_embeds, the image's rows at the image-token
  positions: the embedding stage of ONNX Runtime GenAI's vision pipeline for the peer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vtprune.export import split_op

FIXED_TOP_K = "FixedTopK"


def fixed_top_k_function() -> onnx.FunctionProto:
    """(scores [1, n], k [] int64) -> kept_index [1, min(k, n)], the k highest scores in spatial order."""
    nodes = [
        helper.make_node("Constant", [], ["one1"], value=helper.make_tensor("one1", TensorProto.INT64, [1], [1])),
        helper.make_node("Shape", ["scores"], ["n1"], start=1, end=2),  # [1]
        helper.make_node("Reshape", ["k", "one1"], ["k1"]),  # [1]
        helper.make_node("Min", ["k1", "n1"], ["k_clamped"]),
        helper.make_node("TopK", ["scores", "k_clamped"], ["unused_values", "head"], axis=1, largest=1, sorted=1),
        helper.make_node("TopK", ["head", "k_clamped"], ["kept_index", "unused_positions"], axis=1, largest=0, sorted=1),
    ]
    return helper.make_function(
        split_op.DOMAIN, FIXED_TOP_K, ["scores", "k"], ["kept_index"], nodes,
        opset_imports=[helper.make_opsetid("", split_op.OPSET)],
        doc_string="Benchmark only: Stage 1 with k pinned (top-k of the CLS scores, spatial order).",
    )


def _split_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [n for n in proto.graph.node if n.op_type == "LongTailSplit" and n.domain == split_op.DOMAIN]
    if len(nodes) != 1:
        raise ValueError(f"expected one ai.vtprune::LongTailSplit node in the vision graph, found {len(nodes)}")
    return nodes[0]


def pin_k(proto: onnx.ModelProto) -> onnx.ModelProto:
    """In place: the split node becomes FixedTopK(cls_scores, k_min); feed k_min = the k to pin."""
    _split_node(proto).op_type = FIXED_TOP_K
    if not any(f.name == FIXED_TOP_K and f.domain == split_op.DOMAIN for f in proto.functions):
        proto.functions.append(fixed_top_k_function())
    return proto


def unpruned_vision(proto: onnx.ModelProto, num_patches: int) -> onnx.ModelProto:
    """In place: k_min fixed at n (all patches kept), inputs [pixel_values], outputs [image_features [n, D]]."""
    graph = proto.graph
    k_min = _split_node(proto).input[1]
    kept = [t for t in graph.initializer if t.name != k_min]  # a bundle from before k_min was a plain input has one
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(np.array(num_patches, dtype=np.int64), k_min)])
    kept_inputs = [i for i in graph.input if i.name != k_min]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "bench.squeeze_axes")
    graph.initializer.append(axes)
    graph.node.append(helper.make_node("Squeeze", ["image_embeds", "bench.squeeze_axes"], ["image_features"],
                                       name="/bench/image_features"))
    hidden = graph.output[0].type.tensor_type.shape.dim[2].dim_value
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", hidden]))
    return proto


def embedding_model(table: np.ndarray, image_token_id: int, opset: int = 20) -> onnx.ModelProto:
    """input_ids [B, S] int64, image_features [N, D] -> inputs_embeds [B, S, D].

    Text tokens look up `table` [V, D]; the i-th image token (counted along the sequence) takes row i
    of image_features. A decode step brings no image rows (N = 0): a zero row is appended so the
    gather stays in range, and no position reads it.
    """
    V, D = table.shape
    c = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    nodes = [
        helper.make_node("Equal", ["input_ids", "image_token_id"], ["is_image"]),  # [B, S]
        helper.make_node("Where", ["is_image", "zero", "input_ids"], ["text_ids"]),
        helper.make_node("Gather", ["table", "text_ids"], ["text_embeds"], axis=0),  # [B, S, D]
        helper.make_node("Cast", ["is_image"], ["is_image_i"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["is_image_i", "one"], ["image_rank"]),  # [B, S], 1-based at image tokens
        helper.make_node("Sub", ["image_rank", "one"], ["image_row0"]),
        helper.make_node("Max", ["image_row0", "zero"], ["image_row"]),
        helper.make_node("Concat", ["image_features", "zero_row"], ["features_padded"], axis=0),  # [N + 1, D]
        helper.make_node("Gather", ["features_padded", "image_row"], ["image_embeds"], axis=0),  # [B, S, D]
        helper.make_node("Unsqueeze", ["is_image", "minus_one"], ["is_image3"]),  # [B, S, 1]
        helper.make_node("Where", ["is_image3", "image_embeds", "text_embeds"], ["inputs_embeds"]),
    ]
    graph = helper.make_graph(
        nodes, "bench_embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", D])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", D])],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table"),
                     c("image_token_id", np.int64(image_token_id)), c("zero", np.int64(0)), c("one", np.int64(1)),
                     c("minus_one", np.array([-1], np.int64)), c("zero_row", np.zeros((1, D), np.float32))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
