"""decoder.onnx: the Llama stack with the scored KV cache in and out, and Stage 2 inside the graph.

Three parts, joined in ONNX:
1. `ai.vtprune::PrefillSelect` picks the tokens Stage 2 keeps at prefill (a no-op once heavy + recent
   covers the new tokens, as at every decode step);
2. the dense stack, exported from the PyTorch reference with the `torch.export`-based exporter
   (dynamic batch, sequence and past lengths), returning the last position's logits and each
   layer's un-evicted cache with accumulated scores, q/k/v and gate/up each one MatMul (export/fuse.py);
   traced with its weights hidden, which are then
   attached in memory or streamed into external data (export/streaming.py), so the model's size
   does not set the exporter's memory;
3. one `ai.vtprune::KVEvict` over every layer's cache, capping each at heavy + recent (in the in-place form,
   `ai.vtprune::KVUpdate`, which writes the kept new tokens into fixed buffers: export/inplace.py).
The budgets are graph inputs, so one graph serves every prompt length and budget.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper
from torch import nn

from vtprune.export import eviction_op, inplace, ort_ops
from vtprune.export.fuse import fuse_projections
from vtprune.export.prefill_op import add_prefill_select
from vtprune.export.graph_names import name_nodes
from vtprune.export.io_names import past_names, present_names
from vtprune.export.streaming import Weight, attach_inline, module_reader, parameter_sources, trace
from vtprune.models.cache import ScoredKVCache
from vtprune.models.reference import PrunedLlava


class DenseDecoder(nn.Module):
    """The reference's Llama stack with no eviction: (embeds, positions, past...) -> (logits, present...)."""

    def __init__(self, model: PrunedLlava):
        super().__init__()
        self.m = model
        self.num_layers = len(model.lm.layers)

    def forward(self, inputs_embeds, position_ids, *past):
        floor = self.m.prune.policy == "vfloor"  # its graph cache marks image tokens by a negative score
        cache = ScoredKVCache(image_span=past[3 * self.num_layers] if floor else None)  # [2] after the layers' past
        for i in range(self.num_layers):
            key, value, score = past[3 * i : 3 * i + 3]
            cache.store(i, key, value, score.abs() if floor else score, None, (score < 0) if floor else None)
        hidden = self.m.stack(inputs_embeds, position_ids, cache)  # [B, S, D]
        out = [self.m.head(hidden[:, -1])]  # [B, V]: only the next token is read, so the head runs on one position
        for i in range(self.num_layers):
            key, value, score, _, visual = cache.layer(i)
            out += [key, value, torch.where(visual, -score, score) if floor else score]
        return tuple(out)


# ONNX opset 24's Attention, RotaryEmbedding, RMSNormalization and Swish (export/ort_ops.py; the CLI's default);
# standard ops decomposed (opset >= 18: older runtimes); ONNX Runtime's contrib attention, rotary and norms
# (export/ort_ops.py); the cache as fixed buffers written in place (export/inplace.py)
FORMS = ("fused", "portable", "ort", "inplace")
FUSED_OPSET = 24  # the first opset with all four of the fused form's ops (Swish: 24; the others: 23)


def trace_dense(model: PrunedLlava, opset: int, read: Callable[[str], np.ndarray],
                form: str = "portable") -> tuple[ir.Model, list[Weight]]:  # fmt: skip
    """The dense stack as ONNX IR with its weights hidden (export/streaming.py); inputs/outputs carry a
    `dense.` prefix the Stage-2 nodes connect to. `form`: one of FORMS."""
    cfg = model.config.text_config
    L, Hkv = len(model.lm.layers), cfg.num_key_value_heads
    Dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    slots = form == "inplace"
    B, S, P = 1, 4, 3  # trace sizes; all three are dynamic in the graph
    past = []
    for _ in range(L):
        past += [torch.randn(B, Hkv, P, Dh), torch.randn(B, Hkv, P, Dh), torch.rand(B, Hkv, P)]
        past += [torch.tensor([0, -1, 2]).expand(B, Hkv, P).contiguous()] if slots else []  # slot positions, -1 = empty
    floor = model.prune.policy == "vfloor"  # its eviction needs the image tokens' position ids [first, end)
    span = (torch.tensor([1, 3]),) if floor else ()
    args = (torch.randn(B, S, cfg.hidden_size), torch.arange(P, P + S).unsqueeze(0), *past, *span)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    past_len = torch.export.Dim("capacity" if slots else "past")
    dynamic = {
        "inputs_embeds": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in range(len(past))) + ((None,) if floor else ()),
    }
    in_names = ["dense.inputs_embeds", "dense.position_ids"] + [n for i in range(L) for n in past_names(i, slots)]
    in_names += ["image_span"] if floor else []
    out_names = ["logits"] + [f"dense.{n}" for i in range(L) for n in present_names(i)]  # inplace: new k/v, all scores
    if form == "portable":
        dense, extra, schemas = DenseDecoder(model), {}, contextlib.nullcontext()
    elif form in ("ort", "fused"):
        if form == "fused" and opset < FUSED_OPSET:
            raise ValueError(f"the fused decoder form needs ONNX opset >= {FUSED_OPSET}, got {opset}")
        dense = ort_ops.OrtStack(model)
        schemas = ort_ops.contrib_schemas() if form == "ort" else contextlib.nullcontext()
        extra = {"custom_translation_table": ort_ops.translations(standard=form == "fused")}
    elif form == "inplace":
        dense, extra, schemas = inplace.SlotStack(model), {}, contextlib.nullcontext()
    else:
        raise ValueError(f"unknown decoder form {form!r}; expected one of {FORMS}")
    with schemas:
        graph, weights = trace(dense, args, parameter_sources(dense, model.hf), read, opset, input_names=in_names,
                               output_names=out_names, dynamic_shapes=dynamic, **extra)
    return graph, fuse_projections(graph, weights)  # q/k/v and gate/up: one MatMul each


def export_dense(model: PrunedLlava, opset: int, read: Callable[[str], np.ndarray] | None = None,
                 attach: Callable[[list[Weight]], None] | None = None, form: str = "portable") -> onnx.ModelProto:
    """The dense stack as ONNX. Weights come from `read` (default: the model's own parameters) and are
    attached by `attach` (default: inline; the bundle streams large ones into external data)."""
    read = read or module_reader(model.hf)
    graph, weights = trace_dense(model, opset, read, form)
    if attach is None:
        attach_inline(weights, read)
    else:
        attach(weights)
    proto = ir.to_proto(graph)
    name_nodes(proto.graph)
    return proto


def attach_stage2(dense: onnx.ModelProto, policy: str = "h2o", visual_floor: float = 0.0, slots: bool = False) -> onnx.ModelProto:
    """Wrap the dense graph: PrefillSelect before it (except under snapkv, whose prompt runs whole and is cut
    by KVEvict at its end), one KVEvict (of the eviction policy the dense graph's scores were traced with) over
    every layer's cache after it. slots: the in-place form's dense graph (new keys/values and every entry's score out),
    whose caches KVUpdate writes (export/inplace.py)."""
    graph = dense.graph
    num_layers = sum(1 for o in graph.output if o.name.endswith(".score"))
    dense_inputs = {i.name: i for i in graph.input}
    hidden = dense_inputs["dense.inputs_embeds"].type.tensor_type.shape.dim[2].dim_value
    new_inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("heavy_budget", TensorProto.INT64, []),
        helper.make_tensor_value_info("recent_budget", TensorProto.INT64, []),
    ]
    select = policy != "snapkv"
    before = [
        helper.make_node(
            "PrefillSelect", ["inputs_embeds", "position_ids", "heavy_budget", "recent_budget"],
            ["dense.inputs_embeds", "dense.position_ids"], name="/stage2/PrefillSelect", domain=eviction_op.DOMAIN,
        )
    ] if select else [
        helper.make_node("Identity", [name], [f"dense.{name}"], name=f"/stage2/{name}")
        for name in ("inputs_embeds", "position_ids")
    ]
    new_inputs += [i for i in graph.input if i.name.startswith("past.") or i.name == "image_span"]
    nodes = []
    new_outputs = [o for o in graph.output if o.name == "logits"]
    new_outputs.append(helper.make_tensor_value_info("kept_positions", TensorProto.INT64, ["batch", "kept" if select else "seq"]))
    nodes.append(helper.make_node("Identity", ["dense.position_ids"], ["kept_positions"], name="/stage2/kept_positions"))
    dense_outputs = {o.name: o for o in graph.output}
    evict_inputs, evict_outputs = [], []  # one KVEvict for every layer's cache (export/eviction_op.py)
    if slots:  # KVUpdate's writes wait for the logits (export/inplace.py: write-after-read)
        nodes.append(helper.make_node("ReduceMax", ["logits"], ["/stage2/logits_max"], name="/stage2/logits_max", keepdims=0))
        nodes.append(helper.make_node("IsNaN", ["/stage2/logits_max"], ["/stage2/ready"], name="/stage2/ready"))
    for i in range(num_layers):
        present = present_names(i, slots)
        if slots:
            key, value, score, pos = past_names(i, slots)
            new_key, new_value, scores = (f"dense.{n}" for n in present_names(i))
            nodes.append(helper.make_node(
                inplace.NAME, [key, value, pos, scores, new_key, new_value, "dense.position_ids", "heavy_budget",
                               "recent_budget", "/stage2/ready"], present, name=f"/lm/layers.{i}/KVUpdate", domain=eviction_op.DOMAIN))
            new_outputs += [helper.make_tensor_value_info(p, dense_inputs[q].type.tensor_type.elem_type, _dims(dense_inputs[q]))
                            for p, q in zip(present, past_names(i, slots))]
            continue
        evict_inputs += [f"dense.{n}" for n in present]
        evict_outputs += present
        for name in present:
            src = dense_outputs[f"dense.{name}"]
            new_outputs.append(helper.make_tensor_value_info(name, src.type.tensor_type.elem_type, _dims(src, "present")))
    if evict_outputs:
        nodes.append(helper.make_node("KVEvict", evict_inputs + ["heavy_budget", "recent_budget"], evict_outputs,
                                      name="/lm/KVEvict", domain=eviction_op.DOMAIN))
    for v in graph.value_info if select else ():  # the dense stack runs on the tokens PrefillSelect kept: `kept` long
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = re.sub(r"\bseq\b", "kept", d.dim_param)
    wrapped = helper.make_graph(
        before + list(graph.node) + nodes, "vtprune_decoder", new_inputs, new_outputs, initializer=list(graph.initializer),
        value_info=list(graph.value_info),
    )
    model = helper.make_model(
        wrapped, opset_imports=list(dense.opset_import), functions=list(dense.functions), ir_version=dense.ir_version
    )
    if slots:
        inplace.add_kv_update(model, policy)
    else:
        eviction_op.add_kv_evict(model, policy, visual_floor, layers=num_layers)
    if select:
        add_prefill_select(model)
    return model


def _dims(value_info, rename_past: str | None = None) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        name = d.dim_param or d.dim_value
        if rename_past and isinstance(name, str) and name not in ("batch",):
            name = rename_past
        dims.append(name)
    return dims


def export_decoder(model: PrunedLlava, opset: int = 20, read: Callable[[str], np.ndarray] | None = None,
                   attach: Callable[[list[Weight]], None] | None = None, form: str = "portable") -> onnx.ModelProto:
    """form "fused": the dense stack in ONNX opset 24's attention, rotary, norm and Swish ops; "ort": in ONNX
    Runtime's contrib ops (both export/ort_ops.py); "inplace": the cache as buffers written in place
    (export/inplace.py). Stage 2's rule is the same in every form."""
    return attach_stage2(export_dense(model, opset, read, attach, form), model.prune.policy, model.prune.visual_floor,
                         slots=form == "inplace")

