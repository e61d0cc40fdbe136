"""benchmarks/long_generation.py on the tiny model: both backends, the figures it reports, its JSON and PNG."""

from __future__ import annotations

import json

from vtprune.benchmarks.long_generation import long_generation, summarize, write_results
from vtprune.models.config import PruneConfig


def test_summary_measures_growth_from_the_end_of_the_warm_up():
    rss = [100.0, 104.0, 100.0, 101.0, 106.0, 105.0]  # warm-up of 2 steps: base 104, peak 106 after it
    s = summarize([3, 4, 4, 4, 4, 4], rss, budget=4, warmup=2, seconds=0.6)
    assert s["rss_after_warmup_mb"] == 104.0 and s["rss_max_after_warmup_mb"] == 106.0
    assert abs(s["rss_growth_pct"] - 100 * 2 / 104) < 1e-3 and s["rss_flat"]
    assert s["max_cache"] == 4 and s["cache_within_budget"] and s["ms_per_step"] == 100.0
    assert not summarize([5], [100.0, 100.0], budget=4, warmup=1, seconds=1)["cache_within_budget"]


def test_both_backends_hold_the_same_budget_and_write_json_and_png(tiny_llava_dir, tiny_bundle, tmp_path):
    prune = PruneConfig(heavy_budget=6, recent_budget=4)
    result = long_generation(tiny_llava_dir, tiny_bundle, steps=60, warmup=10, prune=prune, fresh_process=False)
    onnx_run, torch_run = result["runs"]
    for run in (onnx_run, torch_run):
        assert run["steps"] == len(run["cache_lengths"]) == len(run["rss_mb"]) == 60
        assert run["budget"] == 10 and run["max_cache"] == 10 and run["cache_within_budget"]
    assert onnx_run["prompt_tokens"] == torch_run["prompt_tokens"]  # same image, prompt and Stage-1 split
    json_path, png_path = write_results(result, tmp_path)
    assert json.loads(json_path.read_text())["runs"][0]["backend"] == "onnx"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long_generation.json", "long_generation.png"]  # no temp left
