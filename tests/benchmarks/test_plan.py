"""`vtprune plan` and its memory model against hand-computed weight and KV sizes; shapes from config.json."""

import json
from dataclasses import replace

import pytest

from vtprune.benchmarks.memory import GIB, Bits, deployed_bits, footprint, kv_cache_bytes, weight_bytes
from vtprune.benchmarks.plan import plan
from vtprune.cli import main
from vtprune.errors import UserError
from vtprune.models.shapes import PRESETS, ModelShape

# llava-hf/llava-1.5-7b-hf/config.json as published: most Llama sizes are left to LlamaConfig's defaults
LLAVA_7B_HF_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}

SEVEN_B = PRESETS["llava-1.5-7b"]
KV_PER_TOKEN_7B = 2 * 32 * 4096 * 2  # K and V, 32 layers, 4096 wide, fp16


def test_from_config_matches_the_preset():
    shape = ModelShape.from_config(LLAVA_7B_HF_CONFIG)
    assert replace(shape, name=SEVEN_B.name) == SEVEN_B
    assert shape.vision.num_patches == 576 and shape.vision_layers_run == 23


def test_from_config_errors():
    with pytest.raises(UserError, match="text_config: missing .num_attention_heads"):
        ModelShape.from_config({"text_config": {"model_type": "mistral", "hidden_size": 64}})
    with pytest.raises(UserError, match="vision_feature_layer"):
        ModelShape.from_config({**LLAVA_7B_HF_CONFIG, "vision_feature_layer": [-2, -5]})
    with pytest.raises(UserError, match="hidden_size must be a positive integer"):
        ModelShape.from_config({**LLAVA_7B_HF_CONFIG, "vision_config": {"hidden_size": "big"}})


def test_parameter_counts():
    # llava-1.5-7b-hf has 7,063,427,072 parameters; Llama-2-7B's text part ~6.74e9 (vocab 32064 here)
    assert SEVEN_B.params() == 7_063_427_072
    assert SEVEN_B.text.linear_params() + SEVEN_B.text.other_params() == pytest.approx(6.74e9, rel=2e-3)


def test_fp16_weights_and_kv_by_hand():
    bits = deployed_bits("fp16")
    w = weight_bytes(SEVEN_B, bits)
    assert w["text"] == pytest.approx(6.74e9 * 2, rel=2e-3)
    assert sum(w.values()) == SEVEN_B.params() * 2
    assert kv_cache_bytes(SEVEN_B.text, 1, bits.kv) == KV_PER_TOKEN_7B == 524288


def test_int4_weights_by_hand():
    # every Linear at 4 bits + one fp16 scale per 128 weights (4.125 bits; int4-b32: per 32, 4.5 bits);
    # embeddings, norms, biases fp16
    proj_linear, proj_other = SEVEN_B.projector_params()
    linear = SEVEN_B.vision.linear_params() + proj_linear + SEVEN_B.text.linear_params()
    other = SEVEN_B.vision.other_params() + proj_other + SEVEN_B.text.other_params()
    for name, per_weight in (("int4", 4.125), ("int4-b32", 4.5)):
        bits = deployed_bits(name)
        assert sum(weight_bytes(SEVEN_B, bits).values()) == pytest.approx(linear * per_weight / 8 + other * 2)
        assert bits == Bits(weight=per_weight, act=16, kv=16)
    for bad in ("int4-b0", "int8-b32", "int4-bx"):
        with pytest.raises(UserError, match="--precision"):
            deployed_bits(bad)


def test_plan_7b_fp16_and_int4_on_24_gb():
    fp16 = plan(SEVEN_B, "gpu", 24 * GIB, "fp16", context=4096, visual_tokens=576, text_tokens=60,
                heavy_ratio=0.5, recent_ratio=0.5)
    assert fp16["weights_gb"] == pytest.approx(7_063_427_072 * 2 / GIB, abs=1e-3)
    assert fp16["kv_cache_gb"] == pytest.approx(4096 * KV_PER_TOKEN_7B / GIB, abs=1e-3)  # 2.0 GiB
    # 0.5 / 0.5 of a 636-token prompt: the cache is held at 636 positions
    assert fp16["kv_budget_tokens"] == 636
    assert fp16["kv_cache_evicted_gb"] == pytest.approx(636 * KV_PER_TOKEN_7B / GIB, abs=1e-3)
    parts = fp16["weights_gb"] + fp16["kv_cache_evicted_gb"] + fp16["activations_gb"] + fp16["overhead_gb"]
    assert fp16["total_gb"] == pytest.approx(parts, abs=3e-3)
    assert fp16["fits"] and fp16["total_gb"] < fp16["total_without_eviction_gb"]
    int4 = plan(SEVEN_B, "gpu", 24 * GIB, "int4", 4096, 576, 60, 0.5, 0.5)
    assert int4["weights_gb"] < fp16["weights_gb"] / 3
    assert int4["kv_cache_gb"] == fp16["kv_cache_gb"]  # weight-only: the cache stays fp16


def test_13b_fp16_does_not_fit_24_gb_but_int4_does():
    shape = PRESETS["llava-1.5-13b"]
    assert not plan(shape, "gpu", 24 * GIB, "fp16", 4096, 576, 60, 0.5, 0.5)["fits"]
    assert plan(shape, "gpu", 24 * GIB, "int4", 4096, 576, 60, 0.5, 0.5)["fits"]


def test_eviction_makes_the_difference_at_long_context():
    # 7B fp16 with a 32k context: 16 GiB of cache without eviction, 636 positions with it
    r = plan(SEVEN_B, "gpu", 24 * GIB, "fp16", 32768, 576, 60, 0.5, 0.5)
    assert r["fits"] and not r["fits_without_eviction"]


def test_footprint_errors():
    with pytest.raises(UserError, match="--context"):
        footprint(SEVEN_B, Bits(), "gpu", 576, 60, context=100)
    with pytest.raises(UserError, match="--visual-tokens"):
        footprint(SEVEN_B, Bits(), "gpu", 600, 60, context=4096)
    with pytest.raises(UserError, match="--heavy-ratio"):
        footprint(SEVEN_B, Bits(), "gpu", 576, 60, 4096, heavy_ratio=1.5)


def test_cli_plan_json(capsys):
    assert main(["plan", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("fits", "weights_gb", "kv_cache_gb", "kv_cache_evicted_gb", "activations_gb", "overhead_gb",
                "total_gb", "memory_gb"):
        assert key in r
    assert r["gpu"] == "rtx4090" and r["memory_gb"] == 24 and r["model"] == "llava-1.5-7b"
    assert main(["plan", "--preset", "llava-1.5-13b", "--memory-gb", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_gb"] == 80


def test_cli_plan_reads_a_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_7B_HF_CONFIG))
    assert main(["plan", "--model", str(tmp_path), "--precision", "int8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weights_gb"] == pytest.approx(
        plan(SEVEN_B, "gpu", 24 * GIB, "int8", 4096, 576, 60, 0.5, 0.5)["weights_gb"])


@pytest.mark.parametrize("argv, where", [
    (["--preset", "llava-9b"], "--preset"),
    (["--gpu", "v100"], "--gpu"),
    (["--precision", "int3"], "--precision"),
    (["--memory-gb", "-1"], "--memory-gb"),
])
def test_cli_plan_errors(argv, where, capsys):
    assert main(["plan", *argv, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vtprune: error: {where}: ") and err.count("\n") == 1


def test_cli_plan_missing_config(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path), "--json"]) == 2
    assert "config.json" in capsys.readouterr().err
