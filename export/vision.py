"""vision.onnx: the CLIP tower with Stage 1 inside, so one graph gives each image its own k.

Joined in ONNX from three parts:
1. `head`, exported from the reference: embeddings and the first `prune_layer` layers, plus the CLS
   attention scores of the last of them;
2. `ai.vtprune::LongTailSplit` (export/split_op.py): the split point and the kept indices;
3. `tail`, exported with a dynamic `k`: gather CLS + the kept patches, the remaining layers up to the
   feature layer, the projector.
The split is hand-written ONNX because k is data-dependent: the exporters would otherwise have to
trace it (the TorchScript one bakes the traced k into a constant). Both parts are traced with their
weights hidden and the weights attached afterwards (export/streaming.py), as for the decoder.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, compose, helper
from torch import nn

from vtprune.export import split_op
from vtprune.export.graph_names import name_nodes
from vtprune.export.streaming import Weight, attach_inline, module_reader, parameter_sources, trace
from vtprune.models.pruning import cls_attention_scores
from vtprune.models.reference import PrunedLlava


class VisionHead(nn.Module):
    """pixel_values [1, 3, H, W] -> (hidden [1, 1+n, Dv] after prune_layer layers, cls_scores [1, n])."""

    def __init__(self, model: PrunedLlava, prune_layer: int):
        super().__init__()
        self.vision = model.vision
        self.prune_layer = prune_layer

    def forward(self, pixel_values):
        h = self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))
        for i in range(self.prune_layer):
            if i == self.prune_layer - 1:
                scores = cls_attention_scores(self.vision.encoder.layers[i], h)
            h = self.vision.encoder.layers[i](h, None)
        return h, scores


class VisionTail(nn.Module):
    """(hidden [1, 1+n, Dv], kept_index [1, k]) -> image_embeds [1, k, D]: the layers after the split."""

    def __init__(self, model: PrunedLlava, prune_layer: int):
        super().__init__()
        self.layers = model.vision.encoder.layers[prune_layer : model.vision_layers_run]
        self.projector = model.projector  # not the whole model: its (fake, at export) language weights stay out
        self.drop_cls = model.config.vision_feature_select_strategy == "default"

    def forward(self, hidden, kept_index):
        patches = hidden[:, 1:].gather(1, kept_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [1, k, Dv]
        h = torch.cat([hidden[:, :1], patches], dim=1)  # [1, 1+k, Dv]
        for layer in self.layers:
            h = layer(h, None)
        features = h[:, 1:] if self.drop_cls else h
        return self.projector(features)


def _export(module: nn.Module, args, names_in, names_out, dynamic, opset: int, prefix: str, model: PrunedLlava,
            read, attach) -> onnx.ModelProto:
    graph, weights = trace(module, args, parameter_sources(module, model.hf), read, opset, input_names=names_in,
                           output_names=names_out, dynamic_shapes=dynamic)
    attach(weights)
    proto = ir.to_proto(graph)
    name_nodes(proto.graph, prefix)
    return proto


def export_vision(model: PrunedLlava, opset: int = 20, read: Callable[[str], np.ndarray] | None = None,
                  attach: Callable[[list[Weight]], None] | None = None) -> onnx.ModelProto:
    """One graph: pixel_values -> image_embeds [1, k, D], kept_index [1, k], cls_scores [1, n].

    Weights come from `read` (default: the model's own parameters) and are attached by `attach`
    (default: inline; the bundle streams them into external data when the graph is large)."""
    read = read or module_reader(model.hf)
    attach = attach or (lambda weights: attach_inline(weights, read))
    cfg = model.config.vision_config
    prune_layer = model.prune.prune_layer
    size = cfg.image_size
    n = model.num_patches
    pixels = torch.randn(1, 3, size, size)
    head = _export(VisionHead(model, prune_layer), (pixels,), ["pixel_values"], ["hidden", "cls_scores"], None, opset, "/vision_head",
                   model, read, attach)
    k = torch.export.Dim("k", min=1, max=n)
    hidden = torch.randn(1, n + 1, cfg.hidden_size)
    kept = torch.arange(0, n, 2).unsqueeze(0)
    tail = _export(
        VisionTail(model, prune_layer), (hidden, kept), ["hidden", "kept_index"], ["image_embeds"],
        {"hidden": None, "kept_index": {1: k}}, opset, "/vision_tail", model, read, attach,
    )
    head = compose.add_prefix(head, "head.", rename_inputs=False, rename_outputs=False)
    tail = compose.add_prefix(tail, "tail.", rename_inputs=False, rename_outputs=False)

    split = helper.make_node("LongTailSplit", ["cls_scores", "k_min"], ["kept_index"], name="/stage1/LongTailSplit", domain=split_op.DOMAIN)
    graph = helper.make_graph(
        list(head.graph.node) + [split] + list(tail.graph.node),
        "vtprune_vision",
        [head.graph.input[0], helper.make_tensor_value_info("k_min", TensorProto.INT64, [])],
        [
            helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [1, "k", model.config.text_config.hidden_size]),
            helper.make_tensor_value_info("kept_index", TensorProto.INT64, [1, "k"]),
            helper.make_tensor_value_info("cls_scores", TensorProto.FLOAT, [1, n]),
        ],
        initializer=list(head.graph.initializer) + list(tail.graph.initializer),
    )
    opsets = {o.domain: o.version for o in list(head.opset_import) + list(tail.opset_import)}
    opsets[split_op.DOMAIN] = 1
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        functions=list(head.functions) + list(tail.functions) + [split_op.long_tail_split_function(opsets[""])],
        ir_version=head.ir_version,
    )
