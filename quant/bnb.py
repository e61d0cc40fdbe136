"""bitsandbytes weights for the PyTorch reference: what a PyTorch user would do, to compare the ONNX variants with.

`quantize_bnb(hf_model, "int8" | "nf4")` swaps the `nn.Linear` layers of the language model and the projector
for bitsandbytes modules, in place (as `BitsAndBytesConfig(load_in_8bit / load_in_4bit)` would at load time):
  int8  `Linear8bitLt`: LLM.int8() with the outlier threshold 6.0 (transformers' default);
  nf4   `Linear4bit`: NF4, blocks of 64, fp32 compute, no double quantization (transformers' defaults).
`lm_head` stays float, as transformers keeps it; so does the vision tower, which holds Stage 1's score path.
bitsandbytes runs on the CPU with its own kernels (0.45+); it is the optional `[bnb]` extra.
"""

from __future__ import annotations

import logging

from vtprune.errors import UserError

KINDS = ("int8", "nf4")
INT8_THRESHOLD = 6.0
NF4_BLOCK = 64  # bitsandbytes' default block size for 4-bit weights


def import_bnb():
    # Without the optional `kernels` package bitsandbytes warns at import and uses its bundled CPU kernels.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--bnb", "needs bitsandbytes (pip install 'vtprune[bnb]')") from None
    return bitsandbytes


def quantize_bnb(hf_model, kind: str):
    """Replace the text model's and projector's `nn.Linear` layers by bitsandbytes ones; returns the model."""
    if kind not in KINDS:
        raise UserError("--bnb", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    bnb = import_bnb()
    # LLM.int8() casts fp32 inputs to fp16 and logs it on every call: known, and noise once per token.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    for root in (hf_model.model.language_model, hf_model.model.multi_modal_projector):
        _swap_linears(root, kind, bnb)
    return hf_model


def _swap_linears(module, kind: str, bnb) -> None:
    import torch
    from torch import nn

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, _quantized(child, kind, bnb, torch))
        else:
            _swap_linears(child, kind, bnb)


def _quantized(linear, kind: str, bnb, torch):
    weight = linear.weight.data.float()  # [out, in]
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=False,
                                     quant_type="nf4")
        # bitsandbytes 0.50's packed CPU kernel (CPUs with AVX512-BF16) asserts out % 32 == 0 and in >= block;
        # other shapes (tiny test models) take its generic dequantize-and-matmul path, same numbers.
        if linear.out_features % 32 or linear.in_features % NF4_BLOCK:
            q.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.float(), requires_grad=False)
    return q.to(linear.weight.device).eval()  # moving to a device is what quantizes the weight
