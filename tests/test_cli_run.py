"""`vtprune run` on the torch backend, through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from vtprune.cli import main


def run_cli(*argv):
    """Run the CLI in a subprocess; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "vtprune.cli", *map(str, argv)], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_run_json_has_the_documented_keys(tiny_llava_dir, tiny_image, capsys):
    code = main(["run", "--model", str(tiny_llava_dir), "--image", str(tiny_image), "--prompt", "what is in the image ?",
                 "--max-new-tokens", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("text", "input_ids", "token_ids", "visual_tokens_kept", "visual_tokens_total", "prompt_tokens",
                "prefill_ms", "decode_tokens_per_s", "peak_rss_mb"):
        assert key in out, key
    assert out["visual_tokens_total"] == 64 and 1 <= out["visual_tokens_kept"] <= 64
    assert out["input_ids"].count(127) == 1  # one image placeholder
    assert len(out["token_ids"]) <= 5
    # with 0.5 / 0.5 budgets nothing is dropped at prefill: the LLM sees text + kept visual tokens
    assert out["prompt_tokens"] == len(out["input_ids"]) - 1 + out["visual_tokens_kept"]


def test_no_prune_matches_transformers_greedy(tiny_llava_dir, tiny_image, capsys):
    from transformers import LlavaForConditionalGeneration

    main(["run", "--model", str(tiny_llava_dir), "--image", str(tiny_image), "--prompt", "what is red ?",
          "--max-new-tokens", "8", "--no-prune", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens_kept"] == 64
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    ids = out["input_ids"]
    i = ids.index(127)
    hf_ids = torch.tensor([ids[:i] + [127] * 64 + ids[i + 1 :]])
    from vtprune.models.preprocess import PreprocessConfig, preprocess_file

    pixels = torch.from_numpy(preprocess_file(tiny_image, PreprocessConfig.from_file(tiny_llava_dir / "preprocessor_config.json")))
    with torch.no_grad():
        gen = hf.generate(input_ids=hf_ids, pixel_values=pixels, max_new_tokens=8, do_sample=False, eos_token_id=2)
    assert gen[0, hf_ids.shape[1] :].tolist() == out["token_ids"]


def test_errors_are_one_line_exit_2(tiny_llava_dir, tiny_image, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llava_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases = [
        (["--model", pickled], "pickle"),
        (["--model", tiny_llava_dir, "--image", tmp_path / "nope.png"], "nope.png"),
        (["--model", tiny_llava_dir, "--prompt", "<image> <image> two ?"], "--prompt"),
        (["--model", tiny_llava_dir, "--heavy-ratio", "1.5"], "--heavy-ratio"),
        (["--model", tiny_llava_dir, "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    for extra, needle in cases:
        argv = ["run", "--image", tiny_image, "--prompt", "what ?", *extra]
        code, out, err = run_cli(*argv)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("vtprune: error:") and needle in err, err
        assert "Traceback" not in err
