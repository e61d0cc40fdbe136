"""The PyTorch reference of LLaVA-1.5 with the paper's two pruning stages: the oracle for everything else.

It reuses the modules of `transformers.LlavaForConditionalGeneration` (CLIP layers, projector, Llama
layers, rotary embedding) and hand-writes only what pruning changes:
- the vision forward, which scores the patches after `prune_layer` and runs the later layers on CLS + k;
- the Llama attention, which also returns the attention each cached position receives (for H2O) and
  works on a cache whose positions differ per KV head after eviction.
With pruning off it computes what `transformers` computes (tests hold it to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vtprune.errors import UserError
from vtprune.models.cache import ScoredKVCache
from vtprune.models.config import PruneConfig
from vtprune.models.pruning import cls_attention_scores, evict, floor_slots, prefill_select, select_visual_tokens

def rotated_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A Llama attention's projections of x [B, S, D], rotary applied: q [B, Hq, S, Dh], k and v [B, Hkv, S, Dh]."""
    B, S, _ = x.shape
    Dh = attn.head_dim
    q = attn.q_proj(x).view(B, S, -1, Dh).transpose(1, 2)  # [B, Hq, S, Dh]
    k = attn.k_proj(x).view(B, S, -1, Dh).transpose(1, 2)  # [B, Hkv, S, Dh]
    v = attn.v_proj(x).view(B, S, -1, Dh).transpose(1, 2)  # [B, Hkv, S, Dh]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


# A Stage-1 selector: (CLS scores [1, n]) -> kept patch indices [1, k], ascending.
Selector = Callable[[torch.Tensor], torch.Tensor]
# A Stage-1 merger (token-merging baselines, models/baselines.py): (patch states after prune_layer [1, n, Dv],
# that layer's patch keys [1, n, Dv], CLS scores [1, n], kept index [1, k]) -> the kept tokens' states [1, k, Dv].
Merger = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ImageFeatures:
    embeds: torch.Tensor  # [1, k, D_text], projected
    kept_index: torch.Tensor  # [1, k] patch indices, ascending
    cls_scores: torch.Tensor | None  # [1, n] CLS attention after prune_layer (None without Stage 1)


class PrunedLlava(nn.Module):
    def __init__(self, hf_model, prune: PruneConfig | None = None):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.prune = prune or PruneConfig()
        self.vision = hf_model.model.vision_tower  # CLIPVisionModel
        self.projector = hf_model.model.multi_modal_projector
        self.lm = hf_model.model.language_model  # LlamaModel
        self.lm_head = hf_model.lm_head
        n_layers = len(self.vision.encoder.layers)
        fl = self.config.vision_feature_layer
        self.vision_layers_run = fl if fl >= 0 else n_layers + 1 + fl  # hidden_states[fl] = output of this many layers
        if self.prune.visual and self.prune.prune_layer > self.vision_layers_run:
            raise UserError(
                "--prune-layer", f"expected at most {self.vision_layers_run} (the vision feature layer's depth), got {self.prune.prune_layer}"
            )

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_patches(self) -> int:
        return self.vision.embeddings.num_patches

    # ---------------------------------------------------------------- vision (Stage 1)
    @torch.no_grad()
    def encode_image(
        self, pixel_values: torch.Tensor, selector: Selector | None = None, merge: Merger | None = None
    ) -> ImageFeatures:
        """pixel_values [1, 3, H, W] -> projected features of the kept patches.

        Stage 1 scores the patches with the CLS attention of layer `prune_layer` (1-based), keeps the
        selector's patches (default: the long-tail split, k = clamp(i*, k_min, n)) in spatial order and
        runs the remaining layers on CLS + k tokens. Without Stage 1, all n patches are kept.
        `merge` (used with a selector) replaces the kept tokens' states before the remaining layers,
        e.g. by folding the pruned tokens into them (PruMerge, VisionZip).
        """
        if pixel_values.shape[0] != 1:
            raise ValueError(f"one image at a time: k differs per image (got a batch of {pixel_values.shape[0]})")
        layers = self.vision.encoder.layers
        h = self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))  # [1, 1+n, Dv]
        n = h.shape[1] - 1
        kept = torch.arange(n).unsqueeze(0)  # [1, n]
        scores = None
        prune_at = self.prune.prune_layer - 1 if (self.prune.visual or selector is not None) else None
        for i in range(self.vision_layers_run):
            if i == prune_at:
                scores = cls_attention_scores(layers[i], h)  # [1, n]
                if merge is not None:
                    keys = layers[i].self_attn.k_proj(layers[i].layer_norm1(h[:, 1:]))  # [1, n, Dv]
            h = layers[i](h, None)
            if i == prune_at:
                kept = selector(scores) if selector is not None else select_visual_tokens(scores, self.prune.k_min)
                patches = h[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [1, k, Dv]
                if merge is not None:
                    patches = merge(h[:, 1:], keys, scores, kept)  # [1, k, Dv]
                h = torch.cat([h[:, :1], patches], dim=1)  # [1, 1+k, Dv]
        features = h[:, 1:] if self.config.vision_feature_select_strategy == "default" else h
        return ImageFeatures(self.projector(features), kept, scores)

    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image's k embeddings in place of its single <image> token.

        input_ids [1, T] with exactly one image token -> inputs_embeds [1, T - 1 + k, D].
        """
        embeds = self.lm.embed_tokens(input_ids)  # [1, T, D]
        if image_embeds is None:
            return embeds
        where = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if len(where) != 1:
            raise ValueError(f"the prompt has {len(where)} image tokens; expected exactly 1 for 1 image")
        i = int(where[0])
        return torch.cat([embeds[:, :i], image_embeds.to(embeds.dtype), embeds[:, i + 1 :]], dim=1)

    # ---------------------------------------------------------------- language model (Stage 2)
    def _attention(self, layer, x, cos, sin, cache: ScoredKVCache, i: int, position_ids: torch.Tensor):
        """One Llama self-attention over cache + new tokens; stores the new K/V, accumulated scores and
        the position id of each cached entry."""
        attn = layer.self_attn
        B, S, _ = x.shape
        q, k, v = rotated_qkv(attn, x, cos, sin)
        past_k, past_v, past_s, past_p, past_vis = cache.layer(i)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)  # [B, Hkv, P+S, Dh]
            v = torch.cat([past_v, v], dim=2)
        P = k.shape[2] - S
        Hkv, g = k.shape[1], attn.num_key_value_groups
        kk = k.repeat_interleave(g, dim=1)  # [B, Hq, P+S, Dh]
        vv = v.repeat_interleave(g, dim=1)
        w = (q @ kk.transpose(-1, -2)) * attn.scaling  # [B, Hq, S, P+S]
        visible = torch.ones(S, P + S, dtype=torch.bool).tril(diagonal=P)  # query j sees slots <= P + j
        w = w.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)  # [B, Hq, S, P+S]
        out = (probs @ vv).transpose(1, 2).reshape(B, S, -1)  # [B, S, Hq*Dh]
        score = self._policy_score(probs, past_s, Hkv, g)  # [B, Hkv, P+S]
        pos = position_ids[:, None, :].expand(B, Hkv, S)
        vis = None
        if self.prune.policy == "vfloor":  # which entries are image tokens, carried with the cache
            span = cache.image_span if cache.image_span is not None else pos.new_zeros(2)
            vis = (pos >= span[0]) & (pos < span[1])  # [B, Hkv, S]
            if past_k is not None:
                vis = torch.cat([past_vis, vis], dim=-1)  # [B, Hkv, P+S]
        if past_k is not None:  # a cache handed in without positions (the ONNX export's) tracks none
            pos = None if past_p is None else torch.cat([past_p, pos], dim=-1)  # [B, Hkv, P+S]
        if cache.budget is not None:
            heavy, recent = cache.budget
            floor = floor_slots(heavy, recent, self.prune.visual_floor)
            k, v, score, pos, vis = evict(k, v, score, heavy, recent, pos, self.prune.policy, vis, floor)
        cache.store(i, k, v, score, pos, vis)
        return attn.o_proj(out)

    def _policy_score(self, probs: torch.Tensor, past: torch.Tensor | None, Hkv: int, g: int) -> torch.Tensor:
        """Each cached entry's eviction score after this call (models/pruning.py, `keep_index`, says what each
        policy keeps): probs [B, Hq, S, P+S], past [B, Hkv, P] or None -> [B, Hkv, P+S], summed over the query
        heads of each KV head. h2o / vfloor: attention received from every query, added to the past;
        tova: from this call's last query only; snapkv: from this call's last `snap_window` queries, added to
        the past (the prompt's observation window at prefill, the one new token at each decode step)."""
        B, _, S, T = probs.shape
        policy = self.prune.policy
        rows = probs.view(B, Hkv, g, S, T)  # the query heads of each KV head (repeat_interleave's order)
        if policy == "tova":
            return rows[:, :, :, -1].sum(dim=2)  # the newest query only, past dropped
        if policy == "snapkv":
            rows = rows[:, :, :, -self.prune.snap_window :]  # the window (all of S when S is shorter)
        received = rows.sum(dim=(2, 3))  # [B, Hkv, T]: one reduction (one graph node) over heads and queries
        if past is None:
            return received
        return received + torch.cat([past, received.new_zeros(B, Hkv, S)], dim=-1)

    def _decoder(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: ScoredKVCache) -> torch.Tensor:
        """The Llama stack on new tokens: embeds [B, S, D], position_ids [B, S] -> logits [B, S, V]."""
        return self.head(self.stack(embeds, position_ids, cache))

    def stack(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache: ScoredKVCache) -> torch.Tensor:
        """The decoder layers: embeds [B, S, D], position_ids [B, S] -> hidden states [B, S, D] (cache updated)."""
        cos, sin = self.lm.rotary_emb(embeds, position_ids)
        x = embeds
        for i, layer in enumerate(self.lm.layers):
            x = x + self._attention(layer, layer.input_layernorm(x), cos, sin, cache, i, position_ids)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [..., D] -> logits [..., V]."""
        return self.lm_head(self.lm.norm(hidden))

    def image_span(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """Position ids [first, end) of the image's k tokens once spliced into input_ids [1, T] ([2] int64), or None."""
        if image_embeds is None:
            return None
        i = int((input_ids[0] == self.image_token_id).nonzero().flatten()[0])
        return torch.tensor([i, i + image_embeds.shape[1]])

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, image_span: torch.Tensor | None = None) -> tuple[torch.Tensor, ScoredKVCache, torch.Tensor]:
        """Run the prompt (after Stage 1). Returns (logits [B, S', V], cache, kept prompt positions [B, S']).

        Stage 2 at prefill: budgets come from the prompt length L; when heavy + recent < L, the tokens
        with the least causal attention (on the embeddings) are dropped before the first layer, and
        the kept ones keep their original position ids. The cache is then held at that budget. Under
        `snapkv` every prompt token runs instead, and each layer's cache is cut to the budget at the end of
        the prompt by the attention its observation window paid (SnapKV's own prefill compression).
        image_span ([2]: position ids [first, end) of the image tokens, `image_span()`) is what the
        `vfloor` policy reserves its floor for; without it no entry counts as an image token.
        """
        B, L, _ = embeds.shape
        positions = torch.arange(L).unsqueeze(0).expand(B, L)  # [B, L]
        cache = ScoredKVCache(next_position=L, image_span=image_span)
        if self.prune.text:
            heavy, recent = self.prune.budgets(L)
            cache.budget = (heavy, recent)
            if heavy + recent < L and self.prune.policy != "snapkv":
                keep = prefill_select(embeds, heavy, recent)  # [B, heavy + recent]
                embeds = embeds.gather(1, keep.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
                positions = keep
        return self._decoder(embeds, positions, cache), cache, positions

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: ScoredKVCache) -> torch.Tensor:
        """One new token per row: token_ids [B, 1] -> logits [B, 1, V]; the cache is updated (and evicted)."""
        positions = torch.full_like(token_ids, cache.next_position)  # [B, 1]
        cache.next_position += 1
        return self._decoder(self.lm.embed_tokens(token_ids), positions, cache)
