"""The names and symbolic dimensions of every graph input and output: one table, read by the exporters and
written into the manifest, from which the runtime reads them (it never imports this module).

Symbolic dimensions: batch, seq (new tokens this call), kept (of those, what Stage 2's prefill selection
keeps: seq itself at every decode step), past (cached positions, per layer after eviction), present (past +
kept, capped at heavy + recent), capacity (the in-place form's cache slots, the same in and out: export/inplace.py),
k (visual tokens kept for this image). Every tensor in the graphs is
labelled with these (or none), so ONNX Runtime's memory planner never sees one name for two sizes.
"""

from __future__ import annotations


def vision_inputs(image_size: int) -> dict[str, list]:
    """One image at the tower's size (k is per image; CLIP's position embeddings fix the size); `k_min`, Stage 1's
    floor, is a real input (an initializer doubling as input is folded away by onnxsim and polygraphy)."""
    return {"pixel_values": [1, 3, image_size, image_size], "k_min": []}


VISION_OUTPUTS = {"image_embeds": [1, "k", "hidden"], "kept_index": [1, "k"], "cls_scores": [1, "patches"]}


def past_names(layer: int, slots: bool = False) -> list[str]:
    """slots: the in-place form's cache, which also carries each slot's position id."""
    return [f"past.{layer}.{t}" for t in ("key", "value", "score", "pos")[: 4 if slots else 3]]


def present_names(layer: int, slots: bool = False) -> list[str]:
    return [f"present.{layer}.{t}" for t in ("key", "value", "score", "pos")[: 4 if slots else 3]]


def decoder_inputs(num_layers: int, image_span: bool = False, slots: bool = False) -> dict[str, list]:
    """image_span: the graph's eviction policy reads the image tokens' position ids [first, end) (policy vfloor);
    slots: the in-place form (a `pos` per layer, every cache dim `capacity`)."""
    table: dict[str, list] = {
        "inputs_embeds": ["batch", "seq", "hidden"],
        "position_ids": ["batch", "seq"],
        "heavy_budget": [],
        "recent_budget": [],
    }
    if image_span:
        table["image_span"] = [2]
    table.update(_cache_table(num_layers, past_names, "capacity" if slots else "past", slots))
    return table


def decoder_outputs(num_layers: int, slots: bool = False) -> dict[str, list]:
    table: dict[str, list] = {"logits": ["batch", "vocab"], "kept_positions": ["batch", "kept"]}
    table.update(_cache_table(num_layers, present_names, "capacity" if slots else "present", slots))
    return table


def _cache_table(num_layers: int, names, length: str, slots: bool) -> dict[str, list]:
    table = {}
    for i in range(num_layers):
        for name in names(i, slots):
            table[name] = ["batch", "kv_heads", length] + (["head_dim"] if name.endswith((".key", ".value")) else [])
    return table
