"""The decoder as the exporter makes it from a loaded model, and a prefill feed for it (tests of export/)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch

from vtprune.export.decoder import DenseDecoder, attach_stage2
from vtprune.export.fuse import fuse_projections
from vtprune.export.graph_names import name_nodes
from vtprune.export.io_names import past_names, present_names
from vtprune.models.reference import PrunedLlava


def exported_with_data(model: PrunedLlava, opset: int = 20, fuse: bool = True) -> onnx.ModelProto:
    """The decoder as the exporter makes it from a loaded model: real weights, the exporter's own optimizer, then
    (unless `fuse` is off) the projections fused as export/fuse.py does on the streamed graph."""
    cfg = model.config.text_config
    L, Hkv, Dh = len(model.lm.layers), cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    past = []
    for _ in range(L):
        past += [torch.randn(1, Hkv, 3, Dh), torch.randn(1, Hkv, 3, Dh), torch.rand(1, Hkv, 3)]
    args = (torch.randn(1, 4, cfg.hidden_size), torch.arange(3, 7).unsqueeze(0), *past)
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic = {"inputs_embeds": {0: b, 1: s}, "position_ids": {0: b, 1: s}, "past": tuple({0: b, 2: p} for _ in range(3 * L))}
    names_in = ["dense.inputs_embeds", "dense.position_ids"] + [n for i in range(L) for n in past_names(i)]
    names_out = ["logits"] + [f"dense.{n}" for i in range(L) for n in present_names(i)]
    program = torch.onnx.export(DenseDecoder(model).eval(), args, dynamo=True, opset_version=opset, input_names=names_in,
                                output_names=names_out, dynamic_shapes=dynamic, optimize=True, verbose=False)
    if fuse:
        fuse_projections(program.model, [])
    proto = ir.to_proto(program.model)
    name_nodes(proto.graph)
    return attach_stage2(proto, model.prune.policy, model.prune.visual_floor)


def prefill_feed(session, hidden, num_layers, Hkv, Dh, S=6):
    rng = np.random.default_rng(0)
    feed = {"inputs_embeds": rng.standard_normal((1, S, hidden)).astype(np.float32), "position_ids": np.arange(S)[None],
            "heavy_budget": np.array(2), "recent_budget": np.array(2)}
    for i in range(num_layers):
        feed[f"past.{i}.key"] = np.zeros((1, Hkv, 0, Dh), np.float32)
        feed[f"past.{i}.value"] = np.zeros((1, Hkv, 0, Dh), np.float32)
        feed[f"past.{i}.score"] = np.zeros((1, Hkv, 0), np.float32)
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def empty_cache_feed(model: PrunedLlava) -> dict:
    """Every layer's past key/value/score with no cached position, for a prefill of the exported decoder."""
    cfg = model.config.text_config
    Hkv, Dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    feed = {}
    for i in range(len(model.lm.layers)):
        feed[f"past.{i}.key"] = np.zeros((1, Hkv, 0, Dh), np.float32)
        feed[f"past.{i}.value"] = np.zeros((1, Hkv, 0, Dh), np.float32)
        feed[f"past.{i}.score"] = np.zeros((1, Hkv, 0), np.float32)
    return feed


def label_sizes(session, feed: dict) -> dict[str, set]:
    """Every symbolic dimension of the session's inputs and outputs -> the sizes it took in one run on `feed`
    (ONNX Runtime's memory planner reuses buffers by these names: each must name one size)."""
    sizes: dict[str, set] = {}
    for value, array in zip(session.get_outputs(), session.run(None, feed)):
        for label, size in zip(value.shape, array.shape):
            if isinstance(label, str):
                sizes.setdefault(label, set()).add(size)
    for value in session.get_inputs():
        for label, size in zip(value.shape, feed[value.name].shape):
            if isinstance(label, str):
                sizes.setdefault(label, set()).add(size)
    return sizes
