"""FP16 variants of the exported graphs, for GPUs (`vtprune export --fp16`).

ONNX Runtime's own float16 converter does the work. The graph inputs and outputs stay float32, so the
runtime feeds both variants alike, and the `ai.vtprune` functions (split, prefill selection, eviction, the
in-place cache update) stay in float32: their scores are sums of probabilities. So does everything Stage 1's CLS scores are
computed from (the patch embedding and the encoder up to the score layer's attention, `stage1_front`):
the split point is a knife edge, and at CLIP ViT-L's widths a half-precision front kept 57 tokens where
fp32 keeps 47 on a test image. Layers after the split, the projector and the decoder run in fp16.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from vtprune.export.graph_order import outer_reads, sort_nodes, subgraphs

KEEP_FLOAT32 = ["LongTailSplit", "PrefillSelect", "KVEvict", "KVUpdate"]


def stage1_front(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes `LongTailSplit`'s scores depend on (empty for a graph without Stage 1)."""
    nodes = list(proto.graph.node)
    split = next((n for n in nodes if n.op_type == "LongTailSplit"), None)
    if split is None:
        return []
    producer = {out: n for n in nodes for out in n.output}
    front: set[str] = set()
    stack = [producer[split.input[0]]] if split.input[0] in producer else []
    while stack:
        node = stack.pop()
        if node.name not in front:
            front.add(node.name)
            stack += [producer[t] for t in node.input if t in producer]
    return [n.name for n in nodes if n.name in front]


def _readers(proto: onnx.ModelProto) -> dict[str, set[str]]:
    """Tensor name -> names of the nodes that read it."""
    readers: dict[str, set[str]] = {}
    for n in proto.graph.node:
        for t in n.input:
            readers.setdefault(t, set()).add(n.name)
    return readers


def fold_round_trips(model: onnx.ModelProto) -> None:
    """Cast(float16) -> Cast(float) pairs, which the converter makes where a float32 tensor (a graph input, a
    kept weight) reaches a node it leaves in float32, read the float32 tensor instead (the pair would round
    it to half precision); casts left unused are dropped."""
    from onnx import TensorProto

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    renamed = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == TensorProto.FLOAT and first is not None and cast_to(first) == TensorProto.FLOAT16
                and types.get(first.input[0]) == TensorProto.FLOAT):
            renamed[node.output[0]] = first.input[0]
    _rename_reads(graph, renamed)
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in graph.node for t in outer_reads(n)} | outputs  # an If branch's reads count
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _rename_reads(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Every read of a renamed tensor in `graph` and its subgraphs (names are unique across them: SSA)."""
    for node in graph.node:
        node.input[:] = [renamed.get(t, t) for t in node.input]
        for sub in subgraphs(node):
            _rename_reads(sub, renamed)


def own_front_weights(proto: onnx.ModelProto, front: set[str]) -> None:
    """Give the front its own copy of each initializer it shares with later nodes (the exporter merges equal
    ones, such as LayerNorm weights of ones), which the converter would otherwise make float16 for both."""
    readers = _readers(proto)
    shared = {t.name: t for t in proto.graph.initializer if readers.get(t.name, set()) & front and readers[t.name] - front}
    for name, tensor in shared.items():
        copy = proto.graph.initializer.add()
        copy.CopyFrom(tensor)  # external data: the copy points at the same bytes
        copy.name = f"{name}.front"
    for n in proto.graph.node:
        if n.name in front:
            n.input[:] = [f"{t}.front" if t in shared else t for t in n.input]


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    front = stage1_front(proto)
    proto = _copy(proto)
    own_front_weights(proto, set(front))
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=KEEP_FLOAT32, node_block_list=front)
    fold_round_trips(half)
    sort_nodes(half.graph)  # the converter appends its casts out of order (an If branch may read them)
    return half


def to_fp16_external(proto: onnx.ModelProto, folder, location: str, progress=None,
                     half: Callable[[onnx.TensorProto], np.ndarray | None] | None = None) -> onnx.ModelProto:
    """The fp16 variant of a graph whose weights live in external data, one weight in memory at a time.

    ORT's converter reads every initializer it converts (a 7B graph's 28 GB, and it fails on external
    data it cannot reach). So the external weights are handed to it as graph inputs, which it retypes
    to float16 without reading; they come back as initializers written to folder/location. `half(tensor)`
    may give an fp32 initializer's float16 data directly (a checkpoint stored in fp16: its own values, no fp32
    round trip, which was 25 of a 7B export's 35 minutes); every other weight is read back from the
    fp32 data and converted by ORT's own `convert_np_to_float16` (same clamping). The real inputs and
    outputs stay float32, as in `to_fp16`, and so do the weights only Stage 1's front reads.
    """
    from pathlib import Path

    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from vtprune.export.streaming import DataWriter, TensorReader

    folder = Path(folder)
    front = set(stage1_front(proto))
    proto = _copy(proto)
    own_front_weights(proto, front)
    external = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    names = {t.name for t in external}
    readers = _readers(proto)
    fp32 = {t.name for t in external if readers.get(t.name) and readers[t.name] <= front}  # read by the front alone
    skeleton = _copy(proto)  # the converter's input: `external` stays readable in `proto`
    inline = [t for t in skeleton.graph.initializer if t.name not in names]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(inline)
    io = [i.name for i in proto.graph.input] + [o.name for o in proto.graph.output] + sorted(fp32)
    skeleton.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    model16 = convert_float_to_float16(skeleton, keep_io_types=io, op_block_list=KEEP_FLOAT32, node_block_list=sorted(front))
    fold_round_trips(model16)
    inputs = [i for i in model16.graph.input if i.name not in names]
    del model16.graph.input[:]
    model16.graph.input.extend(inputs)
    read = TensorReader(folder)
    with DataWriter(folder, location) as writer:
        for t in external:
            if t.name in fp32:
                data = np.asarray(read(t))
            else:
                direct = half(t) if half is not None else None
                data = direct if direct is not None else convert_np_to_float16(np.asarray(read(t)))
            model16.graph.initializer.append(writer.tensor_proto(t.name, data))
            if progress is not None:
                progress.update(1)
    sort_nodes(model16.graph)
    return model16


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy
