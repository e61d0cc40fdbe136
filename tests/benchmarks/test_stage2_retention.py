"""The Stage-2 retention report: its counting on hand-made caches, and one run on the embedded model."""

import json

import numpy as np
import torch

from vtprune.benchmarks import stage2_retention as S


def test_held_share_and_make_up_count_what_each_head_holds():
    # 2 layers x 2 heads; prompt: positions 0-1 text, 2-5 visual (kept patches labelled obj, bg, obj, bg), 6 text
    positions = [torch.tensor([[[0, 2, 3, 7], [1, 4, 6, 7]]]), torch.tensor([[[2, 4, 6, 8], [0, 1, 2, 4]]])]
    slots = np.array([2, 4])  # the object's two patch tokens
    assert S.held_share(positions, slots) == np.mean([0.5, 0.5, 1.0, 1.0])
    labels_kept = np.array([1, 0, 2, 0])
    counts = S.make_up(positions, first=2, labels_kept=labels_kept, prompt_len=7)
    # per head: (before image, object, background, after image, generated)
    per_head = np.array([[1, 1, 1, 0, 1], [1, 1, 0, 1, 1], [0, 2, 0, 1, 1], [2, 2, 0, 0, 0]])
    assert np.allclose(counts, per_head.mean(0))


def test_a_run_on_the_embedded_model(tmp_path):
    assert S.main(["--limit", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "stage2_retention.json").read_text())
    assert result["descriptions"] == 2 and (tmp_path / "stage2_retention.png").stat().st_size > 0
    assert sum(r["objects"] for r in result["by_rank"]) == result["objects"] > 0
    assert all(0.0 <= r["held_mean"] <= 1.0 for r in result["by_rank"] if r["objects"])
    start = result["cache_make_up"]["0"]
    assert start["generated"] == 0.0 and start["text before the image"] > 0  # the prompt, whole
    end = result["cache_make_up"]["end"]
    # held at the prompt's length (0.5/0.5: one more for an odd length, both halves rounded up; figures to 0.01)
    assert sum(end.values()) <= sum(start.values()) + 1.05
