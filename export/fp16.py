"""FP16 variants of the exported graphs, for GPUs (`vtprune export --fp16`).

ONNX Runtime's own float16 converter does the work. The graph inputs and outputs stay float32, so the
runtime feeds both variants alike, and the `ai.vtprune` functions (split, prefill selection, eviction)
stay in float32: their scores are sums of probabilities, and the split point is a knife edge that
half precision can move (an FP16 vision graph may keep one token more or less than FP32 on some images).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxruntime.transformers.float16 import convert_float_to_float16

KEEP_FLOAT32 = ["LongTailSplit", "PrefillSelect", "KVEvict"]


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEEP_FLOAT32)
    model = ir.from_proto(half)
    model.graph.sort()  # the converter appends its casts out of order
    return ir.to_proto(model)
