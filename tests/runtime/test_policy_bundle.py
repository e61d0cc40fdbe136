"""A bundle exported with each non-default eviction policy answers like the PyTorch reference with that policy,
with eviction active (small budgets), through the runtime's Pipeline (vfloor: the image span fed by the runtime)."""

from __future__ import annotations

import pytest
import torch

from vtprune.models.config import POLICIES, PruneConfig
from vtprune.models.preprocess import preprocess_file
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline

from tiny_models import save_tiny_image


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != PruneConfig().policy])
def test_policy_bundle_matches_the_reference(policy, tiny_llava_dir, tmp_path):
    from vtprune.export.bundle import export_bundle
    from vtprune.models.generate import generate
    from vtprune.models.loading import load_llava
    from vtprune.models.reference import PrunedLlava

    prune = PruneConfig(policy=policy, heavy_budget=5, recent_budget=4, snap_window=3, visual_floor=0.5)
    export_bundle(tiny_llava_dir, tmp_path / "bundle", prune)
    bundle = Bundle.open(tmp_path / "bundle")
    assert bundle.manifest["prune"]["policy"] == policy
    assert ("image_span" in bundle.manifest["io"]["decoder"]["inputs"]) == (policy == "vfloor")
    pipe = Pipeline(bundle)
    model = PrunedLlava(load_llava(tiny_llava_dir), prune)
    for seed in range(4):
        image = save_tiny_image(tmp_path / f"{seed}.png", seed=seed)
        pixels = preprocess_file(image, pipe.preprocess)
        prompt = pipe.tokenizer.build("what is in the image ?")
        onnx_out = pipe.generate(prompt, pixels, prune, max_new_tokens=24, stop_at_eos=False)
        ref = generate(model, torch.from_numpy(prompt.input_ids)[None], torch.from_numpy(pixels), max_new_tokens=24)
        assert onnx_out.token_ids == ref.token_ids, (policy, seed)
        assert onnx_out.cache_tokens == ref.cache_tokens == 9
