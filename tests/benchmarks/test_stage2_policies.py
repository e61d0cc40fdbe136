"""The validation loop that chooses Stage 2's hyper-parameters runs on the shipped checkpoint."""

from vtprune.benchmarks.stage2_policies import validate, validate_budget, validate_split


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


def test_validate_split_pairs_each_split_with_the_default():
    out = validate_split(n=5, splits=((0.65, 0.30),), all_kinds=True)
    runs = out["configs"]
    assert set(runs) == {"stage1", "default", "snapkv-0.65-0.3"}
    assert runs["default"]["prune"]["heavy_ratio"] == runs["default"]["prune"]["recent_ratio"]
    split = runs["snapkv-0.65-0.3"]
    assert split["n_describe"] == 1 and len(split["scores"]) == 5 and split["vs_default"]["n"] == 5
    assert split["vs_default_describe"]["n"] == 1 and runs["stage1"]["cache_share_of_stage1"] == 1.0
    # the short kinds' first word comes from the full prefill under snapkv: a split cannot change it
    short = [i for i, k in enumerate(split["kinds"]) if k != "describe"]
    assert [split["scores"][i] for i in short] == [runs["default"]["scores"][i] for i in short]
    assert out["chosen"]["config"] in (None, *[k for k in runs if k != "stage1" and runs[k]["cache_share_of_stage1"] <= 0.6])


def test_validate_split_pools_validation_seeds_item_by_item():
    out = validate_split(n=1, splits=((0.40, 0.55),), seed=(5, 6))
    split = out["configs"]["snapkv-0.4-0.55"]
    assert out["seed"] == [5, 6] and split["seeds"] == [5, 6] and set(split["per_seed"]) == {"5", "6"}
    assert len(split["scores"]) == 2 and split["vs_default_describe"]["n"] == 2
