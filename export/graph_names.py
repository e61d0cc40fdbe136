"""Readable node names for exported graphs: `/lm/layers.0/self_attn/q_proj/MatMul_3`, so a profile reads like the code.

The `torch.export`-based exporter records each node's module path in its `namespace` metadata; we turn
that path into the node's name (the habit ONNX Runtime GenAI's builder gets right).
"""

from __future__ import annotations

import onnx


def module_path(namespace: str) -> str:
    """': Wrapper/m.lm.layers.0: LlamaDecoderLayer/m.lm.layers.0.self_attn.q_proj: Linear/linear: aten.linear' -> 'lm/layers.0/self_attn/q_proj'."""
    parts = [seg.split(":")[0].strip() for seg in namespace.split("/")[1:-1]]
    if not parts or not parts[-1]:
        return ""
    path = parts[-1]
    for prefix in ("m.", "model."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path.replace(".layers.", "/layers.").replace(".", "/").replace("/layers/", "/layers.")


def name_nodes(graph: onnx.GraphProto, prefix: str = "") -> None:
    """Rename every node after its module path and op type (names stay unique), then drop the exporter's
    per-node metadata: the name now carries what a reader needs, and the metadata was most of the file."""
    seen: dict[str, int] = {}
    for node in graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        path = module_path(namespace)
        base = f"{prefix}/{path}/{node.op_type}" if path else f"{prefix}/{node.op_type}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        del node.metadata_props[:]
