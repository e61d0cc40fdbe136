"""Fused projections: MatMuls that read the same activation with weights of their own become one.

A Llama layer's q/k/v projections read the same normed hidden state, and so do the MLP's gate and up
projections: five GEMMs where two do, each a separate kernel launch and (at int4) a separate pass over
its activation. Here each such group becomes one MatMul on the weights concatenated along the output
axis, followed by a Split, the arrangement ONNX Runtime GenAI's builder writes and the one its fused
decoder kernels expect. The outputs are the same columns computed by the same dot products, so the graph
stays equal to the reference (the H2O scores included). Hidden weights (export/streaming.py) are fused as
recipes (a `Weight` with several sources), so the concatenation happens when each weight is streamed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from vtprune.export.streaming import Weight, placeholder


def fuse_projections(model: ir.Model, weights: list[Weight]) -> list[Weight]:
    """Rewrite `model` in place; returns the weight list with each group's parts replaced by its fused weight."""
    graph = model.graph
    hidden = {id(w.value): w for w in weights}
    groups: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and _weight(node, hidden) is not None:
            groups.setdefault(id(node.inputs[0]), []).append(node)
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        kinds = {_weight(n, hidden)[0] for n in nodes}
        bs = [n.inputs[1] for n in nodes]
        if len(kinds) != 1 or len({b.shape[0] for b in bs}) != 1 or len({id(b) for b in bs}) != len(bs):
            continue  # hidden beside inline, different input widths, or one weight read twice: left as it is
        name = _fused_name([b.name for b in bs])
        if name is None:
            continue
        widths = [int(b.shape[1]) for b in bs]
        shape = ir.Shape([bs[0].shape[0], sum(widths)])
        fused = ir.Value(name=name, shape=shape, type=ir.TensorType(bs[0].dtype))
        if kinds == {"hidden"}:
            if len({hidden[id(b)].perm for b in bs}) != 1:
                continue
            parts = [hidden.pop(id(b)) for b in bs]
            w = Weight(fused, tuple(s for p in parts for s in p.sources), parts[0].perm)
            hidden[id(fused)] = w
            fused.const_value = placeholder(fused)
        else:
            data = np.concatenate([b.const_value.numpy() for b in bs], axis=1)  # [in, sum(out)]
            fused.const_value = ir.tensor(data, name=name)
        graph.register_initializer(fused)
        first = nodes[0]
        matmul = ir.node("MatMul", [first.inputs[0], fused], name=f"{first.name}/fused")
        matmul.outputs[0].name = f"{name}/out"
        sizes = ir.Value(name=f"{name}/split", const_value=ir.tensor(np.array(widths, np.int64), name=f"{name}/split"))
        graph.register_initializer(sizes)
        split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{first.name}/split")
        graph.insert_before(first, [matmul, split])
        names = []
        for node, out in zip(nodes, split.outputs):
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            names.append(node.outputs[0].name)
            node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(nodes, safe=True)
        for out, old in zip(split.outputs, names):
            out.name = old  # the value_info names stay what they were
        for b in bs:
            if not b.uses():
                graph.initializers.pop(b.name, None)
    return list(hidden.values())


def _weight(node: ir.Node, hidden: dict) -> tuple[str, ir.Value] | None:
    b = node.inputs[1] if len(node.inputs) == 2 else None
    if b is None or b.shape is None or len(b.shape) != 2 or not b.is_initializer():
        return None
    if id(b) in hidden:
        return "hidden", b
    return ("inline", b) if isinstance(b.const_value, ir.Tensor) else None


def _fused_name(names: list[str]) -> str | None:
    """`…self_attn.q_proj.weight.T` + k + v -> `…self_attn.q_k_v_proj.weight.T` (the one differing component)."""
    split = [n.split(".") for n in names]
    if len({len(s) for s in split}) != 1:
        return None
    differ = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
    if len(differ) != 1:
        return None
    i = differ[0]
    parts = [s[i] for s in split]
    joined = "_".join(p.removesuffix("_proj") for p in parts) + ("_proj" if all(p.endswith("_proj") for p in parts) else "")
    return ".".join(split[0][:i] + [joined] + split[0][i + 1 :])
