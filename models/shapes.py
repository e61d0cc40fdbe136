"""Model shapes: the sizes a roofline or a memory plan needs, nothing else (no weights, no torch).

One `ModelShape` per LLaVA: a CLIP vision tower, the 2-layer GELU projector, a Llama-family text model.
Named presets cover the paper's models; `ModelShape.from_config` reads a llava-hf `config.json` dict,
filling keys that file leaves out with the defaults `transformers` would use (llava-hf's own
`llava-1.5-7b-hf/config.json` omits most of the Llama sizes and relies on `LlamaConfig`'s defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vtprune.errors import UserError


@dataclass(frozen=True)
class VisionShape:
    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_params(self) -> int:
        """Weights of the matmuls (q, k, v, o, fc1, fc2) of every layer: what weight quantization shrinks."""
        return self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate)

    def other_params(self) -> int:
        """Biases, layer norms, the patch conv, the class and position embeddings (kept in 16 bits)."""
        per_layer = 4 * self.hidden + self.intermediate + self.hidden + 2 * 2 * self.hidden  # biases + 2 LNs
        patch = self.channels * self.patch_size**2 * self.hidden  # CLIP's patch conv has no bias
        embeddings = self.hidden + (self.num_patches + 1) * self.hidden  # class + positions
        return self.layers * per_layer + patch + embeddings + 2 * 2 * self.hidden  # pre- and post-LN


@dataclass(frozen=True)
class TextShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    explicit_head_dim: int | None = None  # config.json's `head_dim` when it is not hidden / heads (Mistral-Nemo, Gemma)
    attention_bias: bool = False  # `attention_bias`: q, k, v and o projections carry biases

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the queries (and of o_proj's input): heads * head_dim, the hidden size unless head_dim is explicit."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_params(self) -> int:
        """q, k, v, o, gate, up, down of every layer, plus lm_head unless tied to the embedding."""
        attn = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        mlp = 3 * self.hidden * self.intermediate
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * (attn + mlp) + lm_head

    def other_params(self) -> int:
        """The token embedding, the RMSNorm weights and any attention biases (kept in 16 bits)."""
        biases = (self.q_dim + 2 * self.kv_dim + self.hidden) if self.attention_bias else 0
        return self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden + self.layers * biases


@dataclass(frozen=True)
class ModelShape:
    name: str
    vision: VisionShape
    text: TextShape
    feature_layer: int = -2  # hidden state of the vision tower the projector reads (LLaVA-1.5: penultimate)
    projector_bias: bool = True

    @property
    def projector_dims(self) -> tuple[int, int, int]:
        """(in, hidden, out) of linear_1 -> GELU -> linear_2."""
        return (self.vision.hidden, self.text.hidden, self.text.hidden)

    @property
    def vision_layers_run(self) -> int:
        """Encoder layers the feature layer needs: 23 of CLIP-L's 24 for feature layer -2."""
        if self.feature_layer < 0:
            return self.vision.layers + 1 + self.feature_layer
        return self.feature_layer

    def projector_params(self) -> tuple[int, int]:
        """(matmul weights, biases) of the projector."""
        d_in, d_hidden, d_out = self.projector_dims
        bias = d_hidden + d_out if self.projector_bias else 0
        return d_in * d_hidden + d_hidden * d_out, bias

    def params(self) -> int:
        proj_linear, proj_other = self.projector_params()
        return (self.vision.linear_params() + self.vision.other_params() + proj_linear + proj_other
                + self.text.linear_params() + self.text.other_params())

    @classmethod
    def from_config(cls, config: dict, name: str = "config.json") -> "ModelShape":
        """Shapes of a llava-hf `config.json` (already parsed). Missing keys take transformers' defaults:
        no `vision_config` at all means LLaVA-1.5's CLIP ViT-L/14-336 (`LlavaConfig`), a partial one
        `CLIPVisionConfig`'s defaults, and a Llama `text_config` `LlamaConfig`'s defaults."""
        if not isinstance(config, dict):
            raise UserError(name, "expected a JSON object (a llava-hf config.json)")
        vision_cfg = config.get("vision_config")
        vision = CLIP_VIT_L_336 if vision_cfg is None else _vision_from(vision_cfg, name)
        text = _text_from(config.get("text_config") or {"model_type": "llama"}, name)
        feature_layer = config.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
            raise UserError(name, f"vision_feature_layer must be one integer, got {feature_layer!r}")
        if not -vision.layers - 1 <= feature_layer <= vision.layers:
            raise UserError(name, f"vision_feature_layer {feature_layer} is outside the {vision.layers}-layer vision tower")
        text_cfg = config.get("text_config") or {}
        tied = bool(text_cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        return cls(
            name=str(config.get("_name_or_path") or name),
            vision=vision,
            text=replace(text, tied_embeddings=tied),
            feature_layer=feature_layer,
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
        )


# transformers' defaults for the keys a config.json may leave out
_CLIP_VISION_DEFAULTS = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072, num_channels=3)
_LLAMA_DEFAULTS = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                       vocab_size=32000, tie_word_embeddings=False)


def _int_field(cfg: dict, key: str, defaults: dict | None, where: str) -> int:
    value = cfg.get(key, (defaults or {}).get(key))
    if value is None:
        raise UserError(where, f"missing {key!r} (a positive integer)")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(where, f"{key} must be a positive integer, got {value!r}")
    return value


def _vision_from(cfg: dict, name: str) -> VisionShape:
    if not isinstance(cfg, dict):
        raise UserError(name, "vision_config must be an object")
    where = f"{name}: vision_config"
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UserError(where, f"model_type is {cfg.get('model_type')!r}, expected 'clip_vision_model'")
    get = lambda key: _int_field(cfg, key, _CLIP_VISION_DEFAULTS, where)  # noqa: E731
    shape = VisionShape(image_size=get("image_size"), patch_size=get("patch_size"), hidden=get("hidden_size"),
                        layers=get("num_hidden_layers"), heads=get("num_attention_heads"),
                        intermediate=get("intermediate_size"), channels=get("num_channels"))
    if shape.hidden % shape.heads:
        raise UserError(where, f"hidden_size {shape.hidden} is not a multiple of num_attention_heads {shape.heads}")
    return shape


def _text_from(cfg: dict, name: str) -> TextShape:
    if not isinstance(cfg, dict):
        raise UserError(name, "text_config must be an object")
    where = f"{name}: text_config"
    model_type = cfg.get("model_type", "llama")
    defaults = _LLAMA_DEFAULTS if model_type == "llama" else None  # other families: every size must be written
    get = lambda key: _int_field(cfg, key, defaults, where)  # noqa: E731
    heads = get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim")
    explicit = _int_field(cfg, "head_dim", None, where) if head_dim is not None else None
    shape = TextShape(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                      kv_heads=_int_field({"num_key_value_heads": kv_heads}, "num_key_value_heads", None, where),
                      intermediate=get("intermediate_size"), vocab=get("vocab_size"),
                      tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                      explicit_head_dim=explicit if explicit and explicit * heads != get("hidden_size") else None,
                      attention_bias=cfg.get("attention_bias") is True)
    if (shape.explicit_head_dim is None and shape.hidden % shape.heads) or shape.heads % shape.kv_heads:
        raise UserError(where, f"hidden_size {shape.hidden}, num_attention_heads {shape.heads} and "
                               f"num_key_value_heads {shape.kv_heads} do not divide evenly")
    return shape


# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336): LLaVA-1.5's vision tower.
CLIP_VIT_L_336 = VisionShape(image_size=336, patch_size=14, hidden=1024, layers=24, heads=16, intermediate=4096)

PRESETS: dict[str, ModelShape] = {
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 = Llama-2-7B shapes; llava-hf pads the vocabulary to 32064.
    "llava-1.5-7b": ModelShape("llava-1.5-7b", CLIP_VIT_L_336,
                               TextShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064)),
    # llava-hf/llava-1.5-13b-hf: Vicuna-13B v1.5 = Llama-2-13B shapes.
    "llava-1.5-13b": ModelShape("llava-1.5-13b", CLIP_VIT_L_336,
                                TextShape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32064)),
    # A LLaVA that a CPU can run: the real CLIP ViT-L/14-336 with TinyLlama-1.1B's shapes (GQA, 4 KV heads),
    # the pairing of bczhou/tiny-llava-v1-hf (llava-hf layout). ~1.1B text parameters.
    "llava-cpu-1b": ModelShape("llava-cpu-1b", CLIP_VIT_L_336,
                               TextShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)),
}


def preset(name: str) -> ModelShape:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError("--preset", f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}") from None
