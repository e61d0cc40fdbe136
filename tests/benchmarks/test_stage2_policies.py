"""The validation loop that chooses Stage 2's hyper-parameters runs on the shipped checkpoint."""

from vtprune.benchmarks.stage2_policies import validate


def test_validate_scores_descriptions_per_config():
    out = validate({"stage1": {"text": False}, "snapkv": {"policy": "snapkv"}}, n=2)
    assert out["split"] == "val" and out["seed"] == 5
    for name in ("stage1", "snapkv"):
        r = out["configs"][name]
        assert len(r["scores"]) == 2 and all(0.0 <= x <= 1.0 for x in r["scores"])
        assert r["cache_end_mean"] > 0
    # Stage 2 holds the cache at the budget; without it the cache grows with the answer
    assert out["configs"]["snapkv"]["cache_end_mean"] < out["configs"]["stage1"]["cache_end_mean"]
