"""The shipped embedded model, exported: the bundle answers the test split exactly like the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtprune.export.bundle import export_bundle
from vtprune.models.embedded import data
from vtprune.models.config import PruneConfig
from vtprune.models.generate import generate
from vtprune.models.loading import default_model_dir, load_llava
from vtprune.models.reference import PrunedLlava
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline
from vtprune.models.preprocess import preprocess


@pytest.fixture(scope="module")
def embedded_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "bundle"
    export_bundle(default_model_dir(), out, PruneConfig())
    return out


def test_greedy_tokens_match_on_the_first_50_test_samples(embedded_bundle):
    pipe = Pipeline(Bundle.open(embedded_bundle))
    model = PrunedLlava(load_llava(default_model_dir()), PruneConfig())
    ks = []
    for i in range(50):
        sample = data.make_sample("test", 0, i)
        prompt = pipe.tokenizer.build(sample.question, pipe.template)
        pixels = preprocess(sample.image, pipe.preprocess)
        ours = pipe.generate(prompt, pixels, max_new_tokens=24)
        ref = generate(model, torch.from_numpy(prompt.input_ids)[None], torch.from_numpy(pixels), max_new_tokens=24,
                       eos_token_id=pipe.tokenizer.eos_token_id)
        assert ours.kept_index == ref.kept_index, f"sample {i}: Stage 1 kept different patches"
        assert ours.token_ids == ref.token_ids, f"sample {i}: greedy tokens differ"
        ks.append(ours.visual_tokens_kept)
    assert len(set(ks)) > 1 and np.mean(ks) < 576
