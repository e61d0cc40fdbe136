"""The decoder's layer in fused attention ops, in two dialects: ONNX opset 24's own ops (the `fused` form, the
export's default: any runtime of that opset) or ONNX Runtime's contrib ops (the `ort` form).

Three torch custom ops (`vtprune::gqa`, `vtprune::rotary`, `vtprune::skip_rms_norm`), each with an eager
implementation (the reference's math, so the torch side can be checked on its own) and a translation the
exporter emits instead of tracing it (`translations(standard)`):

- `gqa` -> Attention (opset 23+, grouped KV heads by `q_num_heads`/`kv_num_heads`, `qk_matmul_output_mode=3`) or
  com.microsoft GroupQueryAttention (`qk_output=2`): either way the softmax probabilities come out beside the
  attention, so Stage 2's scores stay exact (H2O sums them, SnapKV its window's rows). The cache it returns is
  past + new (no shared buffer): KVEvict then caps it, as in the portable graph. The standard op reads an explicit
  boolean mask (query j sees entries <= P + j): its `is_causal` aligns to the top left, wrong behind a cache.
- `rotary` -> RotaryEmbedding (opset 23+ or com.microsoft) on explicit position ids (after eviction or
  PrefillSelect a cached entry's position is not its index, so a rotary that counts from the cache length cannot
  be used).
- `skip_rms_norm` -> Add + RMSNormalization (opset 23+; no standard skip form) or com.microsoft
  SkipSimplifiedLayerNormalization: the residual add and the next RMSNorm.
The fused form also writes the MLP's SiLU as Swish (opset 24).

`export_decoder`'s own default stays the portable graph (the layer decomposed, opset >= 18); the CLI and
`export_bundle` default to the fused form.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

MS_DOMAIN = "com.microsoft"


@torch.library.custom_op("vtprune::gqa", mutates_args=())
def gqa(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, seqlens_k: Tensor, total: Tensor,
        visible: Tensor, num_heads: int, kv_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """q [B, S, Hq*Dh], k/v [B, S, Hkv*Dh] (rotated), past_k/v [B, Hkv, P, Dh] -> (out [B, S, Hq*Dh],
    present_k/v [B, Hkv, P+S, Dh], probs [B, Hq, S, P+S]); query j sees cache entries <= P + j.
    seqlens_k [B] (= P + S - 1) and total [] (= P + S), int32, are what the contrib op reads; visible [S, P+S]
    bool (query j sees entries <= P + j) what the standard op reads."""
    B, S, _ = q.shape
    Dh = q.shape[-1] // num_heads
    g = num_heads // kv_heads
    q4 = q.view(B, S, num_heads, Dh).transpose(1, 2)  # [B, Hq, S, Dh]
    key = torch.cat([past_k, k.view(B, S, kv_heads, Dh).transpose(1, 2)], dim=2)  # [B, Hkv, P+S, Dh]
    value = torch.cat([past_v, v.view(B, S, kv_heads, Dh).transpose(1, 2)], dim=2)
    w = (q4 @ key.repeat_interleave(g, dim=1).transpose(-1, -2)) * scale  # [B, Hq, S, P+S]
    probs = torch.softmax(w.masked_fill(~visible, float("-inf")), dim=-1)
    out = (probs @ value.repeat_interleave(g, dim=1)).transpose(1, 2).reshape(B, S, -1)  # [B, S, Hq*Dh]
    return out, key, value, probs


@gqa.register_fake
def _gqa_fake(q, k, v, past_k, past_v, seqlens_k, total, visible, num_heads, kv_heads, scale):
    B, S, _ = q.shape
    Dh = q.shape[-1] // num_heads
    T = past_k.shape[2] + S
    return (q.new_empty(B, S, num_heads * Dh), past_k.new_empty(B, kv_heads, T, Dh),
            past_v.new_empty(B, kv_heads, T, Dh), q.new_empty(B, num_heads, S, T))


@torch.library.custom_op("vtprune::rotary", mutates_args=())
def rotary(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int) -> Tensor:
    """Llama's rotary embedding (halves, not interleaved): x [B, S, H*Dh], position_ids [B, S],
    cos/sin_cache [max_positions, Dh/2] -> x rotated, same shape."""
    B, S, _ = x.shape
    x4 = x.view(B, S, num_heads, -1)  # [B, S, H, Dh]
    cos, sin = cos_cache[position_ids][:, :, None], sin_cache[position_ids][:, :, None]  # [B, S, 1, Dh/2]
    a, b = x4.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(B, S, -1)


@rotary.register_fake
def _rotary_fake(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("vtprune::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + skip) * weight, x + skip): the residual add and the norm after it, in fp32."""
    s = x + skip
    n = s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(x.dtype), s


@skip_rms_norm.register_fake
def _skip_rms_norm_fake(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


# The schemas onnxscript needs to emit each contrib op (onnx.defs knows none of ONNX Runtime's): inputs, outputs
# and attributes as ONNX Runtime declares them, types narrowed to what this graph feeds.
_SCHEMAS = {
    "GroupQueryAttention": (["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
                            ["output", "present_key", "present_value", "output_qk"],
                            {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "qk_output": "INT"}),
    "RotaryEmbedding": (["input", "position_ids", "cos_cache", "sin_cache"], ["output"], {"interleaved": "INT"}),
    "SkipSimplifiedLayerNormalization": (["input", "skip", "gamma"], ["output", "mean", "inv_std_var", "input_skip_bias_sum"],
                                         {"epsilon": "FLOAT"}),
}
_INT_INPUTS = {"seqlens_k", "total_sequence_length", "position_ids"}


def _schema(name: str):
    from onnx import defs

    inputs, outputs, attributes = _SCHEMAS[name]
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    return defs.OpSchema(
        name, MS_DOMAIN, 1,
        inputs=[param(i, "I" if i in _INT_INPUTS else "T") for i in inputs],
        outputs=[param(o, "T", param_option=optional if o in ("mean", "inv_std_var") else defs.OpSchema.FormalParameterOption.Single)
                 for o in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "floats"), ("I", ["tensor(int32)", "tensor(int64)"], "ints")],
        attributes=[defs.OpSchema.Attribute(a, getattr(defs.OpSchema.AttrType, t), "") for a, t in attributes.items()],
    )


@contextlib.contextmanager
def contrib_schemas():
    """The three schemas registered with onnx.defs while the exporter runs, removed after (so the checker
    keeps treating com.microsoft as a domain it does not know, and skips it)."""
    import onnx.reference  # noqa: F401  builds its table of op names once, before the contrib names join onnx.defs
    from onnx import defs

    added = []
    try:
        for name in _SCHEMAS:
            if not defs.has(name, MS_DOMAIN):
                defs.register_schema(_schema(name))
                added.append(name)
        yield
    finally:
        for name in added:
            defs.deregister_schema(name, 1, MS_DOMAIN)


def translations(standard: bool = False) -> dict:
    """custom op -> onnxscript function emitting its op (torch.onnx.export's custom_translation_table): ONNX
    opset 24's own ops when `standard` (the SiLU as Swish too), else ONNX Runtime's contrib ops (use inside
    `contrib_schemas()`)."""
    import onnxscript

    if standard:  # any runtime of opset 24 runs this graph
        op = onnxscript.values.Opset("", 24)  # (onnxscript 0.7 names opsets up to 23)

        def gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total, visible, num_heads: int, kv_heads: int, scale: float):
            return op.Attention(q, k, v, visible, past_k, past_v, q_num_heads=num_heads, kv_num_heads=kv_heads,
                                scale=scale, qk_matmul_output_mode=3)  # 3: the softmax's output

        def rotary_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
            return op.RotaryEmbedding(x, cos_cache, sin_cache, position_ids, num_heads=num_heads, interleaved=0)

        def skip_rms_norm_onnx(x, skip, weight, eps: float):
            total = op.Add(x, skip)
            return op.RMSNormalization(total, weight, axis=-1, epsilon=eps, stash_type=1), total

        table = {torch.ops.aten.silu.default: lambda x: op.Swish(x, alpha=1.0)}  # the MLP's act: one node, not two
    else:
        ms = onnxscript.values.Opset(MS_DOMAIN, 1)

        def gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total, visible, num_heads: int, kv_heads: int, scale: float):
            return ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, num_heads=num_heads,
                                          kv_num_heads=kv_heads, scale=scale, qk_output=2)

        def rotary_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
            return ms.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0)

        def skip_rms_norm_onnx(x, skip, weight, eps: float):
            out, _, _, total = ms.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
            return out, total

        table = {}
    return {**table, torch.ops.vtprune.gqa.default: gqa_onnx, torch.ops.vtprune.rotary.default: rotary_onnx,
            torch.ops.vtprune.skip_rms_norm.default: skip_rms_norm_onnx}


class OrtStack(nn.Module):
    """The reference's Llama stack written with the three ops: (embeds, positions, past...) -> (logits, present...),
    the same contract as `decoder.DenseDecoder`. Per layer: the fused q/k/v MatMul, two rotary embeddings, one
    attention, the policy's scores from its probabilities (`PrunedLlava._policy_score`, as the reference), o_proj,
    two residual adds each with the norm after it, and the MLP. vfloor: as DenseDecoder, a negative score marks
    an image token in the cache (positions in `image_span`, the last input)."""

    def __init__(self, model):
        super().__init__()
        self.m = model
        cfg = model.config.text_config
        positions = torch.arange(cfg.max_position_embeddings)[None]  # [1, C]
        cos, sin = model.lm.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # [1, C, Dh]: halves repeated
        half = cos.shape[-1] // 2
        self.register_buffer("cos_cache", cos[0, :, :half].contiguous(), persistent=False)  # [C, Dh/2]
        self.register_buffer("sin_cache", sin[0, :, :half].contiguous(), persistent=False)

    def forward(self, inputs_embeds, position_ids, *past):
        layers = self.m.lm.layers
        floor = self.m.prune.policy == "vfloor"
        span = past[3 * len(layers)] if floor else None  # [2]: the image tokens' positions [first, end)
        B, S, _ = inputs_embeds.shape
        total = past[0].shape[2] + S  # every layer's cache has the same length (one budget for all)
        seqlens_k = torch.full((B,), total - 1, dtype=torch.int32)  # [B]
        total_len = torch.full((), total, dtype=torch.int32)
        visible = torch.ones(S, total, dtype=torch.bool).tril(diagonal=total - S)  # [S, P+S]: query j sees <= P + j
        x = inputs_embeds
        n = layers[0].input_layernorm(x)  # [B, S, D]
        out = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            Hq, Hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
            q = rotary(attn.q_proj(n), position_ids, self.cos_cache, self.sin_cache, Hq)  # [B, S, Hq*Dh]
            k = rotary(attn.k_proj(n), position_ids, self.cos_cache, self.sin_cache, Hkv)  # [B, S, Hkv*Dh]
            past_k, past_v, past_s = past[3 * i : 3 * i + 3]
            if floor:
                past_image, past_s = past_s < 0, past_s.abs()  # [B, Hkv, P]
            a, key, value, probs = gqa(q, k, attn.v_proj(n), past_k, past_v, seqlens_k, total_len, visible, Hq, Hkv,
                                       float(attn.scaling))  # fmt: skip
            score = self.m._policy_score(probs, past_s, Hkv, Hq // Hkv)  # [B, Hkv, P+S]
            if floor:
                pos = position_ids[:, None, :].expand(B, Hkv, S)
                image = torch.cat([past_image, (pos >= span[0]) & (pos < span[1])], dim=-1)  # [B, Hkv, P+S]
                score = torch.where(image, -score, score)
            norm = layer.post_attention_layernorm
            n, x = skip_rms_norm(attn.o_proj(a), x, norm.weight, float(norm.variance_epsilon))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.m.lm.norm
            n, x = skip_rms_norm(layer.mlp(n), x, norm.weight, float(norm.variance_epsilon))
            out += [key, value, score]
        return (self.m.lm_head(n[:, -1]), *out)  # logits [B, V]: only the next token is read
