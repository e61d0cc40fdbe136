"""Per-layer roofline of a LLaVA: ops and bytes moved by each layer, time = max(ops / peak, bytes / bandwidth)
(the measured CPU: the weight format's kernel peak and streaming rate, hardware.Hardware.memory_rate).

Each layer counts the bytes of its weights, the activations it loads and stores, and the KV cache it
loads and stores, in the manner of LLM-Viewer (Yuan et al. 2024, "LLM Inference Unveiled",
github.com/hahnyuan/LLM-Viewer, `model_analyzer.py`): matmuls and attention unfused, every
intermediate tensor written to and read back from memory, 2 ops per multiply-add.

Two modes (design.md, "Roofline"):
- paper: LLM-Viewer's semantics, which the paper's Table 6 used: the LLM only (no vision tower, no
  projector), weights/activations/KV all at one bit-width, and two of its conventions kept on purpose
  so its figures come out: the SiLU-and-multiply is sized by the hidden width, not the MLP width, and
  lm_head is one token at hidden * vocab ops (no factor 2). See `benchmarks/table6.py`.
- deployment: what runs: CLIP tower (up to the feature layer, Stage 1 shrinking the tokens after the
  prune layer), projector, LLM prefill, lm_head on the last position, then decode steps; weight-only
  quantization (W8A16, W4A16) with 16-bit activations and KV (32-bit on the CPU runtime).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vtprune.benchmarks.hardware import Hardware
from vtprune.benchmarks.memory import Bits
from vtprune.models.shapes import ModelShape, TextShape, VisionShape

MODES = ("paper", "deployment")


@dataclass(frozen=True)
class Layer:
    """One operator, `count` identical copies (e.g. the same projection in each of 32 decoder layers).
    ops and bytes are for one copy."""

    name: str
    part: str  # vision | projector | text | lm_head
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0
    count: int = 1

    @property
    def memory_access(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, ops per byte moved."""
        return self.ops / self.memory_access if self.memory_access else float("inf")

    def time(self, peak_ops: float, bandwidth: float) -> float:
        """Seconds for one copy: compute- or memory-bound, whichever is slower."""
        return max(self.ops / peak_ops, self.memory_access / bandwidth)

    def bound(self, peak_ops: float, bandwidth: float) -> str:
        return "compute" if self.ops / peak_ops >= self.memory_access / bandwidth else "memory"


# ---- building blocks -------------------------------------------------------------------------------

def linear(name: str, part: str, tokens: int, d_in: int, d_out: int, bits: Bits, count: int = 1,
           output_to_kv: bool = False) -> Layer:
    """[tokens, d_in] @ [d_in, d_out]: 2*tokens*d_in*d_out ops; reads the weight and the input,
    writes the output (into the KV cache for the k/v projections of a decoder)."""
    out = tokens * d_out
    return Layer(
        name, part,
        ops=2 * tokens * d_in * d_out,
        load_weight=d_in * d_out * bits.weight / 8,
        load_act=tokens * d_in * bits.act / 8,
        store_act=0 if output_to_kv else out * bits.act / 8,
        store_kv=out * bits.kv / 8 if output_to_kv else 0,
        count=count,
    )


def attention(part: str, q_tokens: int, kv_tokens: int, heads: int, kv_heads: int, head_dim: int, bits: Bits,
              count: int = 1, cached: bool = True) -> list[Layer]:
    """Unfused attention: scores = Q K^T, softmax (5 ops an element: max, sub, exp, sum, div), probs V.
    K and V come from the KV cache in a decoder (`cached`), from activations in the vision tower.
    Causal masking is not subtracted (LLM-Viewer counts the full square)."""
    # LLM-Viewer books Q in prefill as KV-width cache bytes and K/V per KV head; for MHA at equal bit-widths
    # the sums here are the same, and GQA's Q is counted at its full head count.
    a = bits.act / 8
    k_or_v = kv_tokens * kv_heads * head_dim * (bits.kv if cached else bits.act) / 8  # one of K, V
    from_cache, from_acts = (k_or_v, 0.0) if cached else (0.0, k_or_v)
    q_or_out = q_tokens * heads * head_dim * a
    scores = q_tokens * kv_tokens * heads
    return [
        Layer("qk_matmul", part, ops=2 * scores * head_dim, load_act=q_or_out + from_acts, load_kv=from_cache,
              store_act=scores * a, count=count),
        Layer("softmax", part, ops=5 * scores, load_act=scores * a, store_act=scores * a, count=count),
        Layer("sv_matmul", part, ops=2 * scores * head_dim, load_act=scores * a + from_acts, load_kv=from_cache,
              store_act=q_or_out, count=count),
    ]


def elementwise(name: str, part: str, elements: int, ops_per_element: int, inputs: int, bits: Bits,
                count: int = 1) -> Layer:
    """A norm, residual add or activation: reads `inputs` tensors of `elements`, writes one."""
    a = bits.act / 8
    return Layer(name, part, ops=ops_per_element * elements, load_act=inputs * elements * a,
                 store_act=elements * a, count=count)


# ---- the three parts -------------------------------------------------------------------------------

def decoder_layers(text: TextShape, q_tokens: int, kv_tokens: int, bits: Bits, mode: str) -> list[Layer]:
    """One Llama decoder layer, `text.layers` copies: `q_tokens` new positions attending to `kv_tokens`
    (prefill: both the prompt length; decode: 1 and the cache length)."""
    h, n = text.hidden, text.layers
    part = "text"
    # LLM-Viewer sizes the SiLU-and-multiply by the hidden width; what runs is the MLP width.
    act_width = h if mode == "paper" else text.intermediate
    return [
        elementwise("attn_norm", part, q_tokens * h, 7, 1, bits, n),  # RMSNorm: pow, sum, div, sqrt, mul, ...
        linear("q_proj", part, q_tokens, h, text.q_dim, bits, n),  # q_dim: h unless config.json sets head_dim
        linear("k_proj", part, q_tokens, h, text.kv_dim, bits, n, output_to_kv=True),
        linear("v_proj", part, q_tokens, h, text.kv_dim, bits, n, output_to_kv=True),
        *attention(part, q_tokens, kv_tokens, text.heads, text.kv_heads, text.head_dim, bits, n, cached=True),
        linear("o_proj", part, q_tokens, text.q_dim, h, bits, n),
        elementwise("attn_add", part, q_tokens * h, 1, 1, bits, n),
        elementwise("mlp_norm", part, q_tokens * h, 7, 1, bits, n),
        linear("gate_proj", part, q_tokens, h, text.intermediate, bits, n),
        linear("up_proj", part, q_tokens, h, text.intermediate, bits, n),
        elementwise("mlp_act", part, q_tokens * act_width, 2, 2, bits, n),
        linear("down_proj", part, q_tokens, text.intermediate, h, bits, n),
        elementwise("mlp_add", part, q_tokens * h, 1, 1, bits, n),
    ]


def lm_head(text: TextShape, bits: Bits, mode: str) -> Layer:
    """The last position's logits (generation needs no others). LLM-Viewer counts hidden*vocab ops."""
    if mode == "paper":
        hv = text.hidden * text.vocab
        return Layer("lm_head", "lm_head", ops=hv, load_weight=hv * bits.weight / 8,
                     load_act=text.hidden * bits.act / 8, store_act=text.vocab * bits.act / 8)
    return linear("lm_head", "lm_head", 1, text.hidden, text.vocab, bits)


def encoder_layers(vision: VisionShape, tokens: int, count: int, bits: Bits) -> list[Layer]:
    """One pre-LN CLIP encoder layer on `tokens` (patches + CLS), `count` copies; bidirectional attention."""
    h, part = vision.hidden, "vision"
    return [
        elementwise("layer_norm1", part, tokens * h, 7, 1, bits, count),
        linear("q_proj", part, tokens, h, h, bits, count),
        linear("k_proj", part, tokens, h, h, bits, count),
        linear("v_proj", part, tokens, h, h, bits, count),
        *attention(part, tokens, tokens, vision.heads, vision.heads, vision.head_dim, bits, count, cached=False),
        linear("out_proj", part, tokens, h, h, bits, count),
        elementwise("attn_add", part, tokens * h, 1, 1, bits, count),
        elementwise("layer_norm2", part, tokens * h, 7, 1, bits, count),
        linear("fc1", part, tokens, h, vision.intermediate, bits, count),
        elementwise("quick_gelu", part, tokens * vision.intermediate, 4, 1, bits, count),
        linear("fc2", part, tokens, vision.intermediate, h, bits, count),
        elementwise("mlp_add", part, tokens * h, 1, 1, bits, count),
    ]


def vision_layers(shape: ModelShape, visual_tokens: int, bits: Bits, prune_layer: int = 3) -> list[Layer]:
    """Patch embedding, then the encoder layers up to the feature layer: the first `prune_layer` on all
    patches + CLS, the rest on the `visual_tokens` Stage 1 kept + CLS."""
    v = shape.vision
    n = v.num_patches
    run = shape.vision_layers_run
    before = min(prune_layer, run) if visual_tokens < n else run
    layers = [linear("patch_embed", "vision", n, v.channels * v.patch_size**2, v.hidden, bits),
              elementwise("pre_layrnorm", "vision", (n + 1) * v.hidden, 7, 1, bits)]
    layers += _tag(encoder_layers(v, n + 1, before, bits), "full")
    if run - before > 0:
        layers += _tag(encoder_layers(v, visual_tokens + 1, run - before, bits), "pruned")
    return layers


def projector_layers(shape: ModelShape, visual_tokens: int, bits: Bits) -> list[Layer]:
    d_in, d_hidden, d_out = shape.projector_dims
    return [
        linear("linear_1", "projector", visual_tokens, d_in, d_hidden, bits),
        elementwise("gelu", "projector", visual_tokens * d_hidden, 4, 1, bits),
        linear("linear_2", "projector", visual_tokens, d_hidden, d_out, bits),
    ]


def _tag(layers: list[Layer], suffix: str) -> list[Layer]:
    return [Layer(**{**asdict(layer), "name": f"{layer.name}[{suffix}]"}) for layer in layers]


# ---- whole passes ----------------------------------------------------------------------------------

def prefill_layers(shape: ModelShape, visual_tokens: int, text_tokens: int, bits: Bits, mode: str,
                   prune_layer: int = 3) -> list[Layer]:
    """Every operator of the prefill. Paper mode: the LLM on visual + text tokens, and lm_head."""
    _check_mode(mode)
    seq = visual_tokens + text_tokens
    llm = decoder_layers(shape.text, seq, seq, bits, mode) + [lm_head(shape.text, bits, mode)]
    if mode == "paper":
        return llm
    return vision_layers(shape, visual_tokens, bits, prune_layer) + projector_layers(shape, visual_tokens, bits) + llm


def decode_layers(shape: ModelShape, context: int, bits: Bits, mode: str) -> list[Layer]:
    """One decode step: one new token attending to `context` cached positions, then lm_head."""
    _check_mode(mode)
    return decoder_layers(shape.text, 1, context, bits, mode) + [lm_head(shape.text, bits, mode)]


@dataclass(frozen=True)
class Totals:
    ops: float
    memory_access: float
    load_weight: float
    load_act: float
    store_act: float
    load_kv: float
    store_kv: float
    time: float  # seconds

    def to_dict(self) -> dict:
        return asdict(self)


def totals(layers: list[Layer], hw: Hardware, bits: Bits) -> Totals:
    """Sums over layers and their copies; time at the peak LLM-Viewer picks for these bit-widths."""
    peak, rate = hw.peak_ops(bits.weight, bits.act, bits.kv), hw.memory_rate(bits.weight)
    field = lambda f: float(sum(f(layer) * layer.count for layer in layers))  # noqa: E731
    return Totals(
        ops=field(lambda x: x.ops), memory_access=field(lambda x: x.memory_access),
        load_weight=field(lambda x: x.load_weight), load_act=field(lambda x: x.load_act),
        store_act=field(lambda x: x.store_act), load_kv=field(lambda x: x.load_kv),
        store_kv=field(lambda x: x.store_kv), time=field(lambda x: x.time(peak, rate)),
    )


def decode_time(shape: ModelShape, hw: Hardware, bits: Bits, prompt_tokens: int, new_tokens: int,
                kv_budget: int | None = None, mode: str = "deployment") -> float:
    """Seconds for `new_tokens` decode steps after a prompt of `prompt_tokens`: step i attends to
    prompt + i positions, or to at most `kv_budget` with Stage 2's eviction."""
    total = 0.0
    for i in range(new_tokens):
        context = prompt_tokens + i
        if kv_budget is not None:
            context = min(context, kv_budget)
        total += totals(decode_layers(shape, context, bits, mode), hw, bits).time
    return total


def layer_table(layers: list[Layer], hw: Hardware, bits: Bits) -> list[dict]:
    """Per-operator rows for JSON and the chart: one copy's ops and bytes, its intensity, attainable
    ops/s (min(peak, intensity * bandwidth)), bound, and the time of all its copies."""
    peak, rate = hw.peak_ops(bits.weight, bits.act, bits.kv), hw.memory_rate(bits.weight)
    rows = []
    for layer in layers:
        rows.append({
            "name": layer.name, "part": layer.part, "count": layer.count, "ops": layer.ops,
            "bytes": layer.memory_access, "intensity": layer.intensity,
            "attainable_ops_per_s": min(peak, layer.intensity * rate),
            "bound": layer.bound(peak, rate), "time_s": layer.time(peak, rate) * layer.count,
        })
    return rows


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
