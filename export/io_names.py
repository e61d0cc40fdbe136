"""The names and symbolic dimensions of every graph input and output: one table, read by the exporters and
written into the manifest, from which the runtime reads them (it never imports this module).

Symbolic dimensions: batch, seq (new tokens this call), kept (of those, what Stage 2's prefill selection
keeps: seq itself at every decode step), past (cached positions, per layer after eviction), present (past +
kept, capped at heavy + recent), k (visual tokens kept for this image). Every tensor in the graphs is
labelled with these (or none), so ONNX Runtime's memory planner never sees one name for two sizes.
"""

from __future__ import annotations


def vision_inputs(image_size: int) -> dict[str, list]:
    """One image at the tower's size (k is per image; CLIP's position embeddings fix the size); `k_min`, Stage 1's
    floor, is a real input (an initializer doubling as input is folded away by onnxsim and polygraphy)."""
    return {"pixel_values": [1, 3, image_size, image_size], "k_min": []}


VISION_OUTPUTS = {"image_embeds": [1, "k", "hidden"], "kept_index": [1, "k"], "cls_scores": [1, "patches"]}


def past_names(layer: int) -> list[str]:
    return [f"past.{layer}.key", f"past.{layer}.value", f"past.{layer}.score"]


def present_names(layer: int) -> list[str]:
    return [f"present.{layer}.key", f"present.{layer}.value", f"present.{layer}.score"]


def decoder_inputs(num_layers: int, image_span: bool = False) -> dict[str, list]:
    """image_span: the graph's eviction policy reads the image tokens' position ids [first, end) (policy vfloor)."""
    table: dict[str, list] = {
        "inputs_embeds": ["batch", "seq", "hidden"],
        "position_ids": ["batch", "seq"],
        "heavy_budget": [],
        "recent_budget": [],
    }
    if image_span:
        table["image_span"] = [2]
    for i in range(num_layers):
        key, value, score = past_names(i)
        table[key] = ["batch", "kv_heads", "past", "head_dim"]
        table[value] = ["batch", "kv_heads", "past", "head_dim"]
        table[score] = ["batch", "kv_heads", "past"]
    return table


def decoder_outputs(num_layers: int) -> dict[str, list]:
    table: dict[str, list] = {"logits": ["batch", "vocab"], "kept_positions": ["batch", "kept"]}
    for i in range(num_layers):
        key, value, score = present_names(i)
        table[key] = ["batch", "kv_heads", "present", "head_dim"]
        table[value] = ["batch", "kv_heads", "present", "head_dim"]
        table[score] = ["batch", "kv_heads", "present"]
    return table
