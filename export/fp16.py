"""FP16 variants of the exported graphs, for GPUs (`vtprune export --fp16`).

ONNX Runtime's own float16 converter does the work. The graph inputs and outputs stay float32, so the
runtime feeds both variants alike, and the `ai.vtprune` functions (split, prefill selection, eviction)
stay in float32: their scores are sums of probabilities, and the split point is a knife edge that
half precision can move (an FP16 vision graph may keep one token more or less than FP32 on some images).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.transformers.float16 import convert_float_to_float16

KEEP_FLOAT32 = ["LongTailSplit", "PrefillSelect", "KVEvict"]


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEEP_FLOAT32)
    model = ir.from_proto(half)
    model.graph.sort()  # the converter appends its casts out of order
    return ir.to_proto(model)


def to_fp16_external(proto: onnx.ModelProto, folder, location: str, progress=None,
                     half: Callable[[onnx.TensorProto], np.ndarray | None] | None = None) -> onnx.ModelProto:
    """The fp16 variant of a graph whose weights live in external data, one weight in memory at a time.

    ORT's converter reads every initializer it converts (a 7B graph's 28 GB, and it fails on external
    data it cannot reach). So the external weights are handed to it as graph inputs, which it retypes
    to float16 without reading; they come back as initializers written to folder/location. `half(tensor)`
    may give an fp32 initializer's float16 data directly (a checkpoint stored in fp16: its own values, no fp32
    round trip, which was 25 of a 7B export's 35 minutes); every other weight is read back from the
    fp32 data and converted by ORT's own `convert_np_to_float16` (same clamping). The real inputs and
    outputs stay float32, as in `to_fp16`.
    """
    from pathlib import Path

    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from vtprune.export.streaming import DataWriter, TensorReader

    folder = Path(folder)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    names = {t.name for t in external}
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    inline = [t for t in skeleton.graph.initializer if t.name not in names]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(inline)
    io = [i.name for i in proto.graph.input] + [o.name for o in proto.graph.output]
    skeleton.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    model16 = convert_float_to_float16(skeleton, keep_io_types=io, op_block_list=KEEP_FLOAT32)
    inputs = [i for i in model16.graph.input if i.name not in names]
    del model16.graph.input[:]
    model16.graph.input.extend(inputs)
    read = TensorReader(folder)
    with DataWriter(folder, location) as writer:
        for t in external:
            direct = half(t) if half is not None else None
            data = direct if direct is not None else convert_np_to_float16(np.asarray(read(t)))
            model16.graph.initializer.append(writer.tensor_proto(t.name, data))
            if progress is not None:
                progress.update(1)
    model = ir.from_proto(model16)
    model.graph.sort()
    return ir.to_proto(model)
