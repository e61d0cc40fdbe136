"""Export at any size: trace on fake weights, then stream each weight into the graph's external data.

The model is never materialized. `fake_llava` builds the reference with every parameter a `FakeTensor`
(shapes and dtypes, no storage). `trace` exports a module with `torch.onnx.export(dynamo=True,
optimize=False)` and returns the ONNX IR with every large parameter *hidden* (an initializer whose value is
a placeholder: shape and dtype, no data), then runs the optimizer the exporter would run (onnxscript's),
told not to fold nodes that read a hidden weight, so it folds and fuses everything else as before. Linear weights reach MatMul through a Transpose; that
Transpose is folded here, per weight, into a `Weight` recipe (source tensor, permutation).
`attach_external` then writes the weights one at a time from the checkpoint's shards into `<graph>.onnx.data`,
converted to the target dtype on the way, and points the initializers at their offsets; `attach_inline`
does the same in memory for small graphs. Peak memory is the largest tensor, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

ALIGN = 4096  # external-data offsets page-aligned, so ONNX Runtime can map them
SMALL = 1024  # elements: weights up to this size are optimized with their data (onnx_ir deduplicates up to 1024)


@dataclass
class Weight:
    """A graph initializer whose data comes from model parameters: `source` [out, in] -> permuted by `perm`;
    several sources (a fused projection, export/fuse.py) are each permuted, then joined along the last axis."""

    value: ir.Value
    source: str | tuple[str, ...]  # the parameter's name(s) in transformers' LlavaForConditionalGeneration
    perm: tuple[int, ...] | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else self.source

    @property
    def size(self) -> int:
        return int(np.prod(self.value.shape.numpy()))

    def array(self, read: Callable[[str], np.ndarray]) -> np.ndarray:
        parts = [read(s) for s in self.sources]
        parts = [a.transpose(self.perm) if self.perm is not None else a for a in parts]
        return np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts, axis=-1)


# ------------------------------------------------------------------------------------------ the model


def fake_llava(model_dir: Path, prune):
    """The reference with every parameter a FakeTensor: the exporters trace it, nothing is allocated.

    Buffers the modules compute at construction (rotary frequencies, CLIP's position ids) are not
    weights and are not in the checkpoint, so they are rebuilt real from the config.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vtprune.models.reference import PrunedLlava

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        hf = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    lm = hf.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)  # inv_freq, computed from config
    embeddings = hf.model.vision_tower.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False)
    fake = [name for name, b in hf.named_buffers() if isinstance(b, FakeTensor)]
    if fake:
        raise NotImplementedError(f"buffer {fake[0]} is built at construction and has no real value here")
    return PrunedLlava(hf.eval(), prune)


def parameter_sources(module: nn.Module, hf_model: nn.Module) -> dict[str, str]:
    """The module's parameter names (what the exporter names initializers) -> transformers names."""
    hf_names = {id(p): name for name, p in hf_model.named_parameters(remove_duplicate=False)}
    return {name: hf_names[id(p)] for name, p in module.named_parameters(remove_duplicate=False) if id(p) in hf_names}


# ------------------------------------------------------------------------------------------ tracing


def trace(module: nn.Module, args, sources: dict[str, str], read: Callable[[str], np.ndarray], opset: int,
          **export_kwargs) -> tuple[ir.Model, list[Weight]]:
    """torch.onnx.export with the large parameters hidden from the optimizer; returns the IR and its weights.

    Weights of at most SMALL elements (norms, biases, tiny test models) get their data first and are
    optimized exactly as the exporter would (folded, deduplicated); the rest stay hidden and are returned.
    """
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset, optimize=False, verbose=False,
                                **export_kwargs)
    model = program.model
    weights = [Weight(value, sources[name]) for name, value in model.graph.initializers.items() if name in sources]
    _fold_transposes(model, weights)
    small = [w for w in weights if w.size <= SMALL]
    attach_inline(small, read)
    weights = [w for w in weights if w.size > SMALL]
    for w in weights:
        w.value.const_value = placeholder(w.value)
    hidden = {id(w.value) for w in weights}
    onnxscript.optimizer.optimize_ir(  # folds and simplifies everything but the weights, as the exporter would
        model, should_fold=lambda node: False if any(id(v) in hidden for v in node.inputs if v is not None) else None
    )
    onnxscript.rewriter.onnx_fusions.fuse(model)
    kept = set(model.graph.initializers)
    return model, [w for w in weights if w.value.name in kept]


def _fold_transposes(model: ir.Model, weights: list[Weight]) -> None:
    """Transpose(weight) -> the weight stored transposed (what constant folding does when the data is there)."""
    for w in weights:
        uses = list(w.value.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Transpose" or uses[0].node.domain not in ("", "ai.onnx"):
            continue
        node = uses[0].node
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(range(len(w.value.shape)))[::-1]
        out = node.outputs[0]
        w.perm = perm
        w.value.shape = ir.Shape([w.value.shape[i] for i in perm])
        out.replace_all_uses_with(w.value)
        model.graph.remove(node, safe=True)
        name = w.value.name
        model.graph.initializers.pop(name)  # renamed while unregistered, then put back
        w.value.name = name + ".T"
        w.value.const_value = placeholder(w.value)  # the exporter's tensor has the untransposed shape
        model.graph.register_initializer(w.value)


def placeholder(value: ir.Value) -> ir.ExternalTensor:
    """Shape and dtype, no data: reading it fails loudly (the data is attached after optimization)."""
    nbytes = int(np.prod(value.shape.numpy())) * value.dtype.itemsize
    return ir.ExternalTensor("<not yet written>", 0, nbytes, value.dtype, shape=value.shape, name=value.name)


# ------------------------------------------------------------------------------------------ weights


def attach_inline(weights: list[Weight], read: Callable[[str], np.ndarray]) -> None:
    for w in weights:
        w.value.const_value = ir.tensor(w.array(read).astype(np.float32, copy=False), name=w.value.name)


def module_reader(hf_model: nn.Module) -> Callable[[str], np.ndarray]:
    """Parameter name -> its data, for a model that is in memory (tests export loaded models this way)."""
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    return lambda name: params[name].detach().float().numpy()


class TensorReader:
    """A saved graph's initializer data: from the proto itself, or memory-mapped from its external-data file
    (which must lie inside `folder`), so a pass over a large graph holds one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __call__(self, t) -> np.ndarray:
        from onnx import TensorProto, helper, numpy_helper

        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        path = (self.folder / info["location"]).resolve()
        if self.folder.resolve() not in path.parents:
            raise ValueError(f"initializer {t.name} names {info['location']!r}, outside the bundle")
        return np.memmap(path, dtype=helper.tensor_dtype_to_np_dtype(t.data_type), mode="r",
                         offset=int(info.get("offset", 0)), shape=tuple(t.dims))


class DataWriter:
    """Appends arrays to one external-data file, page-aligned; returns where each landed."""

    def __init__(self, folder: Path, location: str):
        self.folder, self.location = Path(folder), location
        self.file = open(self.folder / location, "wb")
        self.offset = 0

    def add(self, array: np.ndarray) -> tuple[int, int]:
        """Write `array`; returns (offset, length) in bytes."""
        array = np.ascontiguousarray(array)
        pad = (-self.offset) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        if array.size:
            self.file.write(memoryview(array).cast("B"))
        at = self.offset
        self.offset += array.nbytes
        return at, array.nbytes

    def tensor_proto(self, name: str, array: np.ndarray):
        """Write `array` and return an ONNX initializer that points at it."""
        from onnx import TensorProto, helper

        offset, length = self.add(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def attach_external(weights: list[Weight], read: Callable[[str], np.ndarray], writer: DataWriter, dtype=np.float32,
                    progress=None) -> None:
    """Write each weight in turn (converted to `dtype`), then point its initializer at its bytes."""
    for w in weights:
        a = _as(w.array(read), dtype)
        offset, length = writer.add(a)
        w.value.const_value = ir.ExternalTensor(
            writer.location, offset, length, ir.DataType.from_numpy(a.dtype), shape=ir.Shape(a.shape), name=w.value.name,
            base_dir=writer.folder,
        )
        w.value.dtype = ir.DataType.from_numpy(a.dtype)
        del a
        if progress is not None:
            progress.update(1)


def _as(a: np.ndarray, dtype) -> np.ndarray:
    if dtype == np.float16 and a.dtype != np.float16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        return convert_np_to_float16(a)  # ORT's converter: clamps to fp16's range as it does for a whole graph
    return np.ascontiguousarray(a.astype(dtype, copy=False))
