"""The validation loop that chooses Stage 2's hyper-parameters runs on the shipped checkpoint."""

from vtprune.benchmarks.stage2_policies import validate, validate_budget


def test_validate_scores_descriptions_per_config():
    out = validate({"stage1": {"text": False}, "snapkv": {"policy": "snapkv"}}, n=2)
    assert out["split"] == "val" and out["seed"] == 5
    for name in ("stage1", "snapkv"):
        r = out["configs"][name]
        assert len(r["scores"]) == 2 and all(0.0 <= x <= 1.0 for x in r["scores"])
        assert r["cache_end_mean"] > 0
    # Stage 2 holds the cache at the budget; without it the cache grows with the answer
    assert out["configs"]["snapkv"]["cache_end_mean"] < out["configs"]["stage1"]["cache_end_mean"]


def test_validate_budget_chooses_among_the_budgets_under_the_cap():
    out = validate_budget(n=2, shares=(0.5, 0.25), cap=0.6)
    shares = {k: c["cache_share_of_stage1"] for k, c in out["configs"].items()}
    assert shares["stage1"] == 1.0 and shares["snapkv-0.25"] < shares["snapkv-0.5"] < 1.0
    fits = [k for k, s in shares.items() if k != "stage1" and s <= 0.6]
    assert out["chosen"]["config"] == (max(fits, key=lambda k: out["configs"][k]["describe"]) if fits else None)
    assert "snapkv-0.25" in fits  # a quarter of the prompt is far under 60% of the prompt plus the answer
