"""The memory model: weights + KV cache (with and without the eviction budget) + peak activations + runtime overhead.

`vtprune plan` and the roofline's deployment footprint both call `footprint`; nothing else estimates memory.
Byte counts are exact for weights and KV; activations and overhead are estimates (stated below).
Sizes are bytes; `MemoryFootprint.to_dict` reports GiB (2**30 bytes), the unit of a "24 GB" card and nvidia-smi.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig
from vtprune.models.shapes import ModelShape, TextShape
from vtprune.quant import INT4_BLOCK

GIB = 2**30
WEIGHT_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Bits:
    """Bit-widths of matmul weights, activations and the KV cache (floats: INT4 blocks carry a scale)."""

    weight: float = 16
    act: float = 16
    kv: float = 16

    @classmethod
    def uniform(cls, bits: float) -> "Bits":
        """LLM-Viewer's quantized rows (paper mode): weights, activations and KV all at `bits`."""
        return cls(bits, bits, bits)


def deployed_bits(precision: str, act_bits: int = 16, option: str = "--precision") -> Bits:
    """Weight-only quantization as deployed (W8A16, W4A16): activations and KV stay at `act_bits`.

    INT4 is onnxruntime's MatMulNBits: 4-bit weights plus one 16-bit scale per block, INT4_BLOCK weights for
    `int4` (4.125 bits a weight) and N for `int4-bN` (4.5 at block 32). INT8 per-channel scales are one per
    output row: negligible."""
    family, _, block = precision.partition("-b")
    if family not in WEIGHT_BITS or (block and (family != "int4" or not block.isdigit() or int(block) < 1)):
        raise UserError(option, f"unknown precision {precision!r}; expected one of {', '.join(WEIGHT_BITS)} or int4-bN")
    weight = WEIGHT_BITS[family]
    if family == "int4":
        weight = 4 + 16 / (int(block) if block else INT4_BLOCK)
    if family == "fp32":
        act_bits = max(act_bits, 32)
    return Bits(weight=weight, act=act_bits, kv=act_bits)


def weight_bytes(shape: ModelShape, bits: Bits) -> dict[str, float]:
    """Bytes of every loaded weight, by part. Matmul weights (every Linear, lm_head included) at
    `bits.weight`; embeddings, norms, biases and the patch conv stay in the activation dtype."""
    proj_linear, proj_other = shape.projector_params()
    w, a = bits.weight / 8, bits.act / 8
    return {
        "vision": shape.vision.linear_params() * w + shape.vision.other_params() * a,
        "projector": proj_linear * w + proj_other * a,
        "text": shape.text.linear_params() * w + shape.text.other_params() * a,
    }


def kv_cache_bytes(text: TextShape, tokens: int, kv_bits: float) -> float:
    """Keys and values of every layer for `tokens` positions: 2 * layers * tokens * kv_heads * head_dim."""
    return 2 * text.layers * tokens * text.kv_dim * kv_bits / 8


def eviction_budget(prompt_tokens: int, heavy_ratio: float, recent_ratio: float) -> int:
    """heavy + recent cache slots for a prompt of `prompt_tokens` (after Stage 1), rounded as PruneConfig does."""
    heavy, recent = PruneConfig(heavy_ratio=heavy_ratio, recent_ratio=recent_ratio).budgets(prompt_tokens)
    return heavy + recent


def peak_activation_bytes(shape: ModelShape, visual_tokens: int, prompt_tokens: int, act_bits: float) -> float:
    """Largest set of live activations of an eager prefill, batch 1 (an estimate).

    At any moment: the residual stream and its normed copy, plus the biggest transient of one layer:
    attention (Q, K, V and the [heads, T, T] scores and probabilities) or the MLP (gate, up and their
    product; fc1 and its GELU in CLIP). The vision tower sees all patches + CLS until the prune layer;
    the LLM sees the prompt; one row of logits comes out at the end."""
    v, t = shape.vision, shape.text
    n = v.num_patches + 1  # layers before the prune layer see every patch
    vision = n * 2 * v.hidden + max(3 * n * v.hidden + 2 * v.heads * n * n, 2 * n * v.intermediate)
    s = prompt_tokens
    attn = s * (t.hidden + 2 * t.kv_dim) + 2 * t.heads * s * s
    text = s * 2 * t.hidden + max(attn, 3 * s * t.intermediate) + t.vocab
    projector = visual_tokens * (v.hidden + 2 * t.hidden)
    return max(vision, projector, text) * act_bits / 8


def runtime_overhead_bytes(kind: str, resident_bytes: float) -> float:
    """Memory the runtime holds beyond tensors (an estimate): on a GPU about 0.5 GiB of CUDA context and
    library workspaces (cuBLAS, the ONNX Runtime arena), on the CPU about 0.25 GiB of Python and
    onnxruntime; plus 5% of the resident tensors for allocator slack and fragmentation."""
    fixed = 0.5 * GIB if kind == "gpu" else 0.25 * GIB
    return fixed + 0.05 * resident_bytes


@dataclass(frozen=True)
class MemoryFootprint:
    weights: float
    kv_cache: float  # the whole context, no eviction
    kv_cache_evicted: float  # capped at the heavy + recent budget
    activations: float
    overhead: float  # computed on the evicted cache
    context_tokens: int
    kv_budget_tokens: int

    @property
    def total(self) -> float:
        """What vtprune needs: the cache held at the eviction budget."""
        return self.weights + self.kv_cache_evicted + self.activations + self.overhead

    @property
    def total_without_eviction(self) -> float:
        slack = 0.05 * (self.kv_cache - self.kv_cache_evicted)  # the overhead's share of the larger cache
        return self.weights + self.kv_cache + self.activations + self.overhead + slack

    def to_dict(self) -> dict:
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "weights_gb": gib(self.weights),
            "kv_cache_gb": gib(self.kv_cache),
            "kv_cache_evicted_gb": gib(self.kv_cache_evicted),
            "activations_gb": gib(self.activations),
            "overhead_gb": gib(self.overhead),
            "total_gb": gib(self.total),
            "total_without_eviction_gb": gib(self.total_without_eviction),
            "context_tokens": self.context_tokens,
            "kv_budget_tokens": self.kv_budget_tokens,
            "unit": "GiB",
        }


def footprint(shape: ModelShape, bits: Bits, kind: str, visual_tokens: int, text_tokens: int, context: int,
              heavy_ratio: float = 0.5, recent_ratio: float = 0.5) -> MemoryFootprint:
    """Memory to run `shape` with a prompt of visual + text tokens and a total context of `context` tokens
    (prompt + generated), with and without the decode-time eviction of Stage 2."""
    prompt = visual_tokens + text_tokens
    if visual_tokens < 0 or visual_tokens > shape.vision.num_patches:
        raise UserError("--visual-tokens", f"expected 0..{shape.vision.num_patches} (the patches of a "
                                           f"{shape.vision.image_size}px image), got {visual_tokens}")
    if text_tokens < 0:
        raise UserError("--text-tokens", f"expected an integer >= 0, got {text_tokens}")
    if context < prompt:
        raise UserError("--context", f"the context ({context}) must hold the prompt: {visual_tokens} visual + "
                                     f"{text_tokens} text = {prompt} tokens")
    budget = min(context, eviction_budget(prompt, heavy_ratio, recent_ratio))
    weights = sum(weight_bytes(shape, bits).values())
    kv = kv_cache_bytes(shape.text, context, bits.kv)
    kv_evicted = kv_cache_bytes(shape.text, budget, bits.kv)
    activations = peak_activation_bytes(shape, visual_tokens, prompt, bits.act)
    overhead = runtime_overhead_bytes(kind, weights + kv_evicted + activations)
    return MemoryFootprint(weights=weights, kv_cache=kv, kv_cache_evicted=kv_evicted, activations=activations,
                           overhead=overhead, context_tokens=context, kv_budget_tokens=budget)
