"""The in-place decoder form: the KV cache as fixed buffers that each call updates by scatter, never rebuilds.

In the portable and ort forms every call concatenates the past with the new tokens and gathers what eviction
keeps: two copies of the whole cache per decode step, and a cache that changes size, so it must cross the
runtime's hands each step. Here each layer's cache is a buffer of `capacity` slots, the same shape in and out:

    past.i.key/value [B, Hkv, C, Dh], past.i.score [B, Hkv, C], past.i.pos [B, Hkv, C] (position id per slot,
    -1 = empty) -> present.i.* of the same shapes, meant to be bound to the same memory (IO binding).

Why slots can be in any order: attention is a sum over cached entries, so it does not depend on where each
entry sits (softmax over [slots, new tokens] with empty slots masked, summed in another order: equal up to
float rounding). Only eviction reads order (the `recent` newest, ties to the lower position), and `pos` carries
it: `KVUpdate` sorts the entries by position, applies the same keep rule as KVEvict (`keep_index_nodes`), then
writes each kept new token into a slot whose entry was dropped (ScatterND), and marks slots left over empty.
Kept entries never move, so at a decode step only one slot per KV head is written, and ONNX Runtime's
ScatterND writes in place when its output is bound to its input's memory.

Write-after-read: the writes read a flag computed from the logits (`ready`), so they run after everything
that reads the old cache (attention, the mask, the scores); without that edge ONNX Runtime could schedule a
value scatter before the attention that reads the slot it overwrites.

Capacity: the budgets stay graph inputs, as in the other forms; a buffer must hold what the budget keeps
(C >= min(heavy + recent, cached + new)); the runtime sizes it once per prompt. vfloor is not supported.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from vtprune.export.eviction_op import DOMAIN, DOMAIN_VERSION, keep_index_nodes, keep_reference
from vtprune.models.reference import rotated_qkv

NAME = "KVUpdate"
INPUTS = ("key", "value", "slot_pos", "score_all", "new_key", "new_value", "new_pos", "budget_heavy", "budget_recent", "ready")
OUTPUTS = ("key_out", "value_out", "score_out", "pos_out")
POLICIES = ("h2o", "snapkv", "tova")


class SlotStack(nn.Module):
    """The reference's Llama stack over slot buffers: (embeds [B, S, D], positions [B, S], past (key, value,
    score, pos) per layer) -> (logits [B, V], per layer: new keys/values [B, Hkv, S, Dh], every entry's score
    [B, Hkv, C + S] (the C slots, then the new tokens)). No cache is concatenated: attention scores the slots and
    the new tokens separately and joins only the logits [B, Hq, S, C + S]; `KVUpdate` then writes the buffers."""

    def __init__(self, model):
        super().__init__()
        if model.prune.policy not in POLICIES:
            raise ValueError(f"the in-place decoder supports the policies {', '.join(POLICIES)}, not {model.prune.policy!r}")
        self.m = model

    def forward(self, inputs_embeds, position_ids, *past):
        cos, sin = self.m.lm.rotary_emb(inputs_embeds, position_ids)
        x = inputs_embeds
        out = []
        for i, layer in enumerate(self.m.lm.layers):
            a, key, value, score = self._attention(layer, layer.input_layernorm(x), cos, sin, *past[4 * i : 4 * i + 4])
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            out += [key, value, score]
        return (self.m.head(x[:, -1]), *out)  # logits [B, V]: only the next token is read

    def _attention(self, layer, x, cos, sin, past_k, past_v, past_s, past_p):
        attn = layer.self_attn
        B, S, _ = x.shape
        Dh = attn.head_dim
        q, k, v = rotated_qkv(attn, x, cos, sin)  # [B, Hq, S, Dh], [B, Hkv, S, Dh] x 2
        Hq, Hkv = q.shape[1], k.shape[1]
        qg = q.reshape(B, Hkv, Hq // Hkv * S, Dh)  # the query heads of each KV head (repeat_interleave's order)
        scale = float(attn.scaling)

        def over_slots(qg, k, v, past_k, past_v, past_s, past_p):
            return self._over_slots(qg, k, v, past_k, past_v, past_s, past_p, scale)

        def new_only(qg, k, v, past_k, past_v, past_s, past_p):  # an empty buffer (a fresh prompt): no slot to read
            a, score = self._over_slots(qg, k, v, past_k[:, :, :0], past_v[:, :, :0], past_s[:, :, :0], past_p[:, :, :0], scale)
            return a, torch.cat([torch.zeros_like(past_s), score], dim=-1)  # [B, Hkv, C+S]

        a, score = torch.cond((past_p >= 0).any(), over_slots, new_only, (qg, k, v, past_k, past_v, past_s, past_p))
        a = a.view(B, Hq, S, Dh).transpose(1, 2).reshape(B, S, -1)  # [B, S, Hq*Dh]
        return attn.o_proj(a), k, v, score

    def _over_slots(self, qg, k, v, past_k, past_v, past_s, past_p, scale: float):
        """Attention of the grouped queries qg [B, Hkv, g*S, Dh] over the C slots (empty ones masked) and the S new
        tokens (causal) -> (a [B, Hkv, g*S, Dh], every entry's score [B, Hkv, C+S])."""
        B, Hkv, gS, Dh = qg.shape
        S, C = k.shape[2], past_k.shape[2]
        g = gS // S
        w_past = (qg @ past_k.transpose(-1, -2)) * scale  # [B, Hkv, g*S, C]
        w_past = w_past.masked_fill((past_p < 0)[:, :, None, :], float("-inf"))  # empty slots
        w_new = (qg @ k.transpose(-1, -2)) * scale  # [B, Hkv, g*S, S]
        causal = torch.ones(S, S, dtype=torch.bool).tril().repeat(g, 1)  # [g*S, S]: query j sees new tokens <= j
        w_new = w_new.masked_fill(~causal, float("-inf"))
        w = torch.cat([w_past, w_new], dim=-1)  # [B, Hkv, g*S, C+S]
        probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(qg.dtype)
        a = probs[..., :C] @ past_v + probs[..., C:] @ v  # [B, Hkv, g*S, Dh]
        score = self.m._policy_score(probs.view(B, Hkv * g, S, C + S), past_s, Hkv, g)  # [B, Hkv, C+S]
        return a, score


def kv_update_reference(key, value, slot_pos, score_all, new_key, new_value, new_pos, heavy: int, recent: int,
                        policy: str = "h2o"):  # fmt: skip
    """NumPy oracle of KVUpdate, row by row: the entries (slots with pos >= 0, then the new tokens) in position
    order, KVEvict's keep rule (`keep_reference`) at min(heavy + recent, entries), kept slots left where they are,
    the kept new tokens written into the freed slots in ascending order, slots left over marked empty."""
    key, value, pos = key.copy(), value.copy(), slot_pos.copy()
    B, H, C = slot_pos.shape
    S = new_pos.shape[-1]
    score = score_all[..., :C].copy()
    heavy, recent = max(int(heavy), 0), max(int(recent), 0)
    for b in range(B):
        for h in range(H):
            valid = [c for c in range(C) if slot_pos[b, h, c] >= 0]
            entries = sorted(valid, key=lambda c: slot_pos[b, h, c]) + [C + j for j in range(S)]  # position order
            V = len(entries)
            if heavy + recent >= V:
                kept = entries
            else:
                s = np.array([score_all[b, h, e] for e in entries])
                kept = [entries[i] for i in keep_reference(s, heavy, recent, policy)]
            freed = [c for c in range(C) if c not in kept]
            new = sorted(e - C for e in kept if e >= C)
            if len(new) > len(freed):
                raise ValueError(f"capacity {C} cannot hold {len(kept)} kept entries")
            for c, j in zip(freed, new):
                key[b, h, c], value[b, h, c] = new_key[b, h, j], new_value[b, h, j]
                score[b, h, c], pos[b, h, c] = score_all[b, h, C + j], new_pos[b, j]
            for c in freed[len(new) :]:
                pos[b, h, c] = -1
    return key, value, score, pos


def kv_update_function(opset: int, policy: str = "h2o") -> onnx.FunctionProto:
    """The FunctionProto `ai.vtprune::KVUpdate` of one eviction policy (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"KVUpdate supports the policies {', '.join(POLICIES)}, not {policy!r}")
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{NAME}/{outputs[0]}", **attrs))

    def const(name, values, dtype=TensorProto.INT64, dims=None):
        node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)] if dims is None else dims, values))

    const("u_zero", [0]), const("u_last", [-1]), const("u_axis1", [1])
    const("u_zero_s", [0], dims=[]), const("u_one_s", [1], dims=[])
    const("u_neg_inf_f", [-np.inf], TensorProto.FLOAT, dims=[])
    # Every entry's position: the C slots, then the S new tokens (the same for every head).
    node("Shape", ["slot_pos"], ["u_C"], start=-1)  # [1]
    node("Shape", ["new_pos"], ["u_S"], start=-1)  # [1]
    node("Add", ["u_C", "u_S"], ["u_T"])
    node("Shape", ["slot_pos"], ["u_rows"], start=0, end=2)  # [2]: B, H
    node("Concat", ["u_rows", "u_S"], ["u_new_shape"], axis=0)
    node("Unsqueeze", ["new_pos", "u_axis1"], ["u_new_pos1"])  # [B, 1, S]
    node("Expand", ["u_new_pos1", "u_new_shape"], ["u_new_pos"])  # [B, H, S]
    node("Concat", ["slot_pos", "u_new_pos"], ["u_all_pos"], axis=-1)  # [B, H, T]
    node("Less", ["u_all_pos", "u_zero"], ["u_empty"])
    # The budget, at most the capacity: keep min(heavy + recent, C) of the T entries. Empty slots rank last
    # (-inf) and are kept only as filler when fewer entries are held, so the entries kept are the reference's.
    node("Reshape", ["budget_heavy", "u_last"], ["u_bh1"])
    node("Reshape", ["budget_recent", "u_last"], ["u_br1"])
    node("Max", ["u_bh1", "u_zero"], ["u_bh"])
    node("Max", ["u_br1", "u_zero"], ["u_br"])
    node("Add", ["u_bh", "u_br"], ["u_budget_all"])
    node("Min", ["u_budget_all", "u_C"], ["u_budget"])
    node("Min", ["u_zero" if policy == "tova" else "u_br", "u_budget"], ["recent"])  # tova: no recent window
    node("Sub", ["u_budget", "recent"], ["heavy"])
    # Position order, empty slots first (their keys idx - T are negative and distinct): KVEvict's order.
    node("Squeeze", ["u_T", "u_zero"], ["u_T_s"])
    node("Range", ["u_zero_s", "u_T_s", "u_one_s"], ["u_idx"])  # [T]
    node("Sub", ["u_idx", "u_T"], ["u_idx_neg"])
    node("Where", ["u_empty", "u_idx_neg", "u_all_pos"], ["u_sort_key"])  # [B, H, T], distinct per row
    node("TopK", ["u_sort_key", "u_T"], ["u_sorted_unused", "u_order"], axis=-1, largest=0, sorted=1)  # [B, H, T]
    node("CastLike", ["u_neg_inf_f", "score_all"], ["u_neg_inf"])
    node("Where", ["u_empty", "u_neg_inf", "score_all"], ["u_held_score"])
    node("GatherElements", ["u_held_score", "u_order"], ["score"], axis=-1)  # [B, H, T] in position order
    for n in keep_index_nodes(opset, index=False):  # KVEvict's rule on (score, heavy, recent) -> kept [B, H, T]
        n.name = f"{NAME}/{n.output[0]}"
        nodes.append(n)
    node("ScatterElements", ["u_empty", "u_order", "kept"], ["u_kept_b"], axis=-1)  # [B, H, T] back in entry order
    node("Slice", ["u_kept_b", "u_zero", "u_C", "u_last"], ["u_slot_kept"])  # [B, H, C]
    node("Slice", ["u_kept_b", "u_C", "u_T", "u_last"], ["u_new_kept"])  # [B, H, S]
    # The n kept new tokens of a row go to its first n freed slots; its other freed slots become empty.
    node("Not", ["u_slot_kept"], ["u_freed"])
    node("Cast", ["u_freed"], ["u_freed_i"], to=TensorProto.INT64)
    node("CumSum", ["u_freed_i", "u_last"], ["u_freed_rank"])  # 1-based among the row's freed slots
    node("Cast", ["u_new_kept"], ["u_new_kept_i"], to=TensorProto.INT64)
    node("ReduceSum", ["u_new_kept_i", "u_last"], ["u_n_new"], keepdims=1)  # [B, H, 1]
    node("LessOrEqual", ["u_freed_rank", "u_n_new"], ["u_within"])
    node("And", ["u_freed", "u_within"], ["u_fill"])
    node("Xor", ["u_freed", "u_fill"], ["u_clear"])
    node("NonZero", ["u_fill"], ["u_dst_t"])  # [3, N], row-major: row by row, slots ascending
    node("Transpose", ["u_dst_t"], ["u_dst_early"], perm=[1, 0])  # [N, 3]
    node("NonZero", ["u_new_kept"], ["u_src_t"])  # [3, N], the same rows with the same counts
    node("Transpose", ["u_src_t"], ["u_src"], perm=[1, 0])
    node("NonZero", ["u_clear"], ["u_clear_t"])
    node("Transpose", ["u_clear_t"], ["u_cleared"], perm=[1, 0])  # [M, 3]
    # Every write into a bound buffer takes its slots from u_dst, which waits for `ready` (either branch of the
    # Where is the same value): everything that reads the old buffers has run by then.
    node("Where", ["ready", "u_dst_early", "u_dst_early"], ["u_dst"])
    for src, out, data in (("new_key", "key_out", "key"), ("new_value", "value_out", "value")):
        node("GatherND", [src, "u_src"], [f"u_{src}_rows"])  # [N, Dh]
        node("ScatterND", [data, "u_dst", f"u_{src}_rows"], [out])  # in place when bound to `data`'s memory
    node("Slice", ["score_all", "u_zero", "u_C", "u_last"], ["u_score_slots"])  # [B, H, C]
    node("Slice", ["score_all", "u_C", "u_T", "u_last"], ["u_score_new"])  # [B, H, S]
    node("GatherND", ["u_score_new", "u_src"], ["u_score_rows"])  # [N]
    node("ScatterND", ["u_score_slots", "u_dst", "u_score_rows"], ["score_out"])
    node("Shape", ["u_cleared"], ["u_M"], start=0, end=1)
    node("ConstantOfShape", ["u_M"], ["u_minus"], value=helper.make_tensor("u_m", TensorProto.INT64, [1], [-1]))
    node("ScatterND", ["slot_pos", "u_cleared", "u_minus"], ["u_pos_cleared"])  # a new tensor: slot_pos is read only
    node("GatherND", ["u_new_pos", "u_src"], ["u_pos_rows"])  # [N]
    node("ScatterND", ["u_pos_cleared", "u_dst", "u_pos_rows"], ["pos_out"])
    return helper.make_function(DOMAIN, NAME, list(INPUTS), list(OUTPUTS), nodes,
                                opset_imports=[helper.make_opsetid("", opset)],
                                doc_string=__doc__.split("\n\n")[0] + f" Policy: {policy}.")


def add_kv_update(model: onnx.ModelProto, policy: str) -> onnx.ModelProto:
    """Add KVUpdate of `policy` and the `ai.vtprune` opset import to `model` (in place), at its opset."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == NAME for f in model.functions):
        model.functions.append(kv_update_function(opset, policy))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def kv_update_model(policy: str = "h2o", opset: int = 20, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model around KVUpdate with dynamic shapes, for tests and profiling."""
    graph = helper.make_graph(
        [helper.make_node(NAME, list(INPUTS), list(OUTPUTS), name="update", domain=DOMAIN)], "kv_update",
        [helper.make_tensor_value_info("key", dtype, ["B", "H", "C", "Dh"]),
         helper.make_tensor_value_info("value", dtype, ["B", "H", "C", "Dh"]),
         helper.make_tensor_value_info("slot_pos", TensorProto.INT64, ["B", "H", "C"]),
         helper.make_tensor_value_info("score_all", dtype, ["B", "H", "T"]),
         helper.make_tensor_value_info("new_key", dtype, ["B", "H", "S", "Dh"]),
         helper.make_tensor_value_info("new_value", dtype, ["B", "H", "S", "Dh"]),
         helper.make_tensor_value_info("new_pos", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("budget_heavy", TensorProto.INT64, []),
         helper.make_tensor_value_info("budget_recent", TensorProto.INT64, []),
         helper.make_tensor_value_info("ready", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("key_out", dtype, ["B", "H", "C", "Dh"]),
         helper.make_tensor_value_info("value_out", dtype, ["B", "H", "C", "Dh"]),
         helper.make_tensor_value_info("score_out", dtype, ["B", "H", "C"]),
         helper.make_tensor_value_info("pos_out", TensorProto.INT64, ["B", "H", "C"])],
    )
    return add_kv_update(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="vtprune"), policy)
