"""The bitsandbytes reference path: which layers are swapped, how far the logits move, and the clear error
when bitsandbytes (the optional [bnb] extra) is not installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from vtprune.cli import main
from vtprune.errors import UserError
from vtprune.models.loading import load_llava
from vtprune.quant.bnb import quantize_bnb

# max |logits - fp32| / max |fp32 logits| on the tiny random model (measured: int8 0.007, nf4 0.18)
TOLERANCE = {"int8": 0.03, "nf4": 0.35}


def test_missing_bitsandbytes_is_a_user_error(tiny_llava_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(UserError) as e:
        quantize_bnb(load_llava(tiny_llava_dir), "nf4")
    assert (e.value.where, e.value.what) == ("--bnb", "needs bitsandbytes (pip install 'vtprune[bnb]')")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_text_model_and_projector_are_swapped_and_logits_stay_close(tiny_llava_dir, kind):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ids = torch.tensor([[1, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = load_llava(tiny_llava_dir)(input_ids=ids).logits  # [1, T, V]
        model = quantize_bnb(load_llava(tiny_llava_dir), kind)
        logits = model(input_ids=ids).logits
    swapped = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    text = [m for m in model.model.language_model.modules() if isinstance(m, nn.Linear)]
    projector = [m for m in model.model.multi_modal_projector.modules() if isinstance(m, nn.Linear)]
    assert len(text) == 2 * 7 and len(projector) == 2 and all(isinstance(m, swapped) for m in text + projector)
    assert not any(isinstance(m, swapped) for m in model.model.vision_tower.modules())  # Stage 1's scores stay float
    assert type(model.lm_head) is nn.Linear
    rel = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert rel <= TOLERANCE[kind], f"{kind}: max relative logit difference {rel:.4f} > {TOLERANCE[kind]}"


def test_run_with_bnb_generates_within_the_budget(tiny_llava_dir, tiny_image, capsys):
    pytest.importorskip("bitsandbytes")
    argv = ["run", "--model", str(tiny_llava_dir), "--bnb", "nf4", "--image", str(tiny_image), "--prompt", "what is red ?",
            "--heavy-budget", "4", "--recent-budget", "3", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "torch-bnb-nf4" and len(out["token_ids"]) == 6
    assert out["prompt_tokens"] == 7 and out["cache_tokens"] <= 7
