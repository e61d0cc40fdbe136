"""The bench's latency chart: time to first token split into vision and prefill, and decode tokens/s, per system."""

from __future__ import annotations

import os
from pathlib import Path


def latency_png(path: Path, systems: list[dict], length: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in systems if s["status"] == "ok"]
    labels = [s["label"] for s in rows]
    vision = [s["measured"]["vision_ms"] / 1e3 for s in rows]
    prefill = [s["measured"]["prefill_ms"] / 1e3 for s in rows]
    rate = [s["measured"]["decode_tokens_per_s"].get(length) or 0.0 for s in rows]
    predicted_ttft = [s["roofline"]["ttft_ms"] / 1e3 for s in rows]
    predicted_rate = [s["roofline"]["decode_tokens_per_s"].get(length) or 0.0 for s in rows]
    y = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.6), sharey=True)
    left.barh(y, vision, color="tab:green", label="vision")
    left.barh(y, prefill, left=vision, color="tab:blue", label="prefill")
    left.scatter(predicted_ttft, y, marker="|", s=300, color="black", label="roofline TTFT")
    left.set_xlabel("time to first token (s)")
    left.set_yticks(list(y), labels)
    left.invert_yaxis()
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)  # below the bars: none hidden
    right.barh(y, rate, color="tab:orange", label=f"measured, {length} new tokens")
    right.scatter(predicted_rate, y, marker="|", s=300, color="black", label="roofline")
    right.set_xlabel("decode tokens / s")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    for ax in (left, right):
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
