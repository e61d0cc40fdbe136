"""Checkpoints as transformers writes them (issue 20), each answered like transformers or refused in one line:
a Mistral text model whose sliding window is shorter than the sequence is refused (vtprune attends to the whole
cache), with the window named; a window longer than the sequence runs."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tiny_models import save_tiny_image, save_tiny_tokenizer


def save_tiny_mistral_llava(path, sliding_window: int):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                              image_size=112, patch_size=14, projection_dim=32)
    text = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, sliding_window=sliding_window,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=127)).save_pretrained(path)
    return save_tiny_tokenizer(path)


def run(model, image, *extra):
    return subprocess.run([sys.executable, "-m", "vtprune.cli", "run", "--model", str(model), "--image", str(image),
                           "--prompt", "what is in the image ?", "--json", *extra], capture_output=True, text=True, timeout=300)


def test_mistral_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    model = save_tiny_mistral_llava(tmp_path / "mistral", sliding_window=48)
    assert json.loads((model / "config.json").read_text())["text_config"]["sliding_window"] == 48  # as transformers saved it
    image = save_tiny_image(tmp_path / "i.png")
    p = run(model, image, "--max-new-tokens", "2")  # 64 image tokens + the text: past the 48-token window
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtprune: error: --prompt: ") and "sliding attention window is 48" in lines[0]


def test_mistral_sliding_window_longer_than_the_sequence_runs(tmp_path):
    model = save_tiny_mistral_llava(tmp_path / "mistral", sliding_window=256)
    image = save_tiny_image(tmp_path / "i.png")
    p = run(model, image, "--max-new-tokens", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads(p.stdout)["token_ids"]) >= 1
    p = run(model, image, "--max-new-tokens", "400")  # the answer would run past the window
    assert p.returncode == 2 and p.stderr.startswith("vtprune: error: --max-new-tokens: ") and "window is 256" in p.stderr
