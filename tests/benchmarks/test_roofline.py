"""Roofline formulas on hand-computed tiny cases, the deployment report, the chart and the CPU micro-benchmark."""

import json

import pytest

from vtprune.benchmarks import hardware
from vtprune.benchmarks.hardware import Hardware
from vtprune.benchmarks.memory import Bits, deployed_bits
from vtprune.benchmarks.roofline import (attention, decode_layers, decode_time, layer_table, linear, prefill_layers,
                                         totals, vision_layers)
from vtprune.benchmarks.roofline_cli import deployment, measured_point, write_png
from vtprune.models.shapes import PRESETS, ModelShape, TextShape, VisionShape

# 100 B/s and 1000 ops/s (16-bit), 4000 ops/s (8-bit): small numbers that keep hand arithmetic exact
TOY_HW = Hardware("toy", bandwidth=100.0, fp16_ops=1000.0, int8_ops=4000.0, memory_bytes=10**6)
TINY = ModelShape(
    "tiny",
    VisionShape(image_size=8, patch_size=4, hidden=8, layers=3, heads=2, intermediate=16),  # 4 patches
    TextShape(hidden=8, layers=2, heads=2, kv_heads=2, intermediate=16, vocab=10),
)


def test_linear_ops_and_bytes():
    layer = linear("fc", "text", tokens=3, d_in=5, d_out=7, bits=Bits(16, 16, 16))
    assert layer.ops == 2 * 3 * 5 * 7
    assert layer.load_weight == 5 * 7 * 2
    assert layer.load_act == 3 * 5 * 2
    assert layer.store_act == 3 * 7 * 2
    assert layer.memory_access == 70 + 30 + 42
    # 142 bytes at 100 B/s = 1.42 s, 210 ops at 1000 ops/s = 0.21 s: memory-bound
    assert layer.time(TOY_HW.fp16_ops, TOY_HW.bandwidth) == pytest.approx(1.42)
    assert layer.bound(TOY_HW.fp16_ops, TOY_HW.bandwidth) == "memory"


def test_linear_bit_widths_are_separate():
    layer = linear("k_proj", "text", tokens=3, d_in=5, d_out=7, bits=Bits(weight=4, act=16, kv=8), output_to_kv=True)
    assert layer.load_weight == 5 * 7 * 4 / 8
    assert layer.load_act == 3 * 5 * 2
    assert layer.store_act == 0 and layer.store_kv == 3 * 7 * 1


def test_attention_small():
    # 4 queries, 4 keys, 2 query heads sharing 1 KV head, head_dim 3, 16-bit
    qk, softmax, sv = attention("text", q_tokens=4, kv_tokens=4, heads=2, kv_heads=1, head_dim=3, bits=Bits())
    scores = 4 * 4 * 2
    assert qk.ops == 2 * scores * 3 == sv.ops
    assert qk.load_act == 4 * 2 * 3 * 2 and qk.load_kv == 4 * 1 * 3 * 2 and qk.store_act == scores * 2
    assert softmax.ops == 5 * scores and softmax.load_act == softmax.store_act == scores * 2
    assert sv.load_act == scores * 2 and sv.load_kv == 4 * 1 * 3 * 2 and sv.store_act == 4 * 2 * 3 * 2
    # in the vision tower K and V are activations, not cache
    qk_v, _, sv_v = attention("vision", 4, 4, 2, 1, 3, Bits(), cached=False)
    assert qk_v.load_kv == 0 and qk_v.load_act == qk.load_act + qk.load_kv
    assert sv_v.memory_access == sv.memory_access


def test_prefill_ops_of_a_tiny_llm_by_hand():
    seq, h, inter, vocab, hd = 5, 8, 16, 10, 4
    per_layer = (
        2 * seq * (h * h + h * h + h * h + h * h)  # q, k, v, o (kv_dim = h)
        + 2 * seq * 3 * h * inter  # gate, up, down
        + 2 * (2 * seq * seq * 2 * hd)  # qk and sv, 2 heads
        + 5 * seq * seq * 2  # softmax
        + 2 * 7 * seq * h + 2 * seq * h  # 2 RMSNorms, 2 residual adds
    )
    layers = prefill_layers(TINY, 0, seq, Bits(), "deployment")
    llm_ops = sum(x.ops * x.count for x in layers if x.part in ("text", "lm_head"))
    # deployment: SiLU*up over the MLP width, lm_head 2*h*vocab for the last position
    assert llm_ops == 2 * (per_layer + 2 * seq * inter) + 2 * h * vocab
    paper = totals(prefill_layers(TINY, 0, seq, Bits(), "paper"), TOY_HW, Bits())
    # paper (LLM-Viewer): SiLU*up sized by the hidden width, lm_head h*vocab, the LLM only
    assert paper.ops == 2 * (per_layer + 2 * seq * h) + h * vocab


def test_totals_time_is_sum_of_layer_maxima_and_int8_peak_rule():
    layers = decode_layers(TINY, context=6, bits=Bits(), mode="deployment")
    expect = sum(max(x.ops / 1000.0, x.memory_access / 100.0) * x.count for x in layers)
    assert totals(layers, TOY_HW, Bits()).time == pytest.approx(expect)
    assert TOY_HW.peak_ops(8, 8, 8) == 4000.0 and TOY_HW.peak_ops(4, 4, 4) == 4000.0
    assert TOY_HW.peak_ops(4, 16, 16) == 1000.0  # weight-only INT4 computes in 16 bits


def test_vision_layers_run_on_fewer_tokens_after_the_prune_layer():
    # feature layer -2 of 3 layers -> 2 layers run; prune layer 1 -> 1 on 4+1 tokens, 1 on 2+1
    layers = vision_layers(TINY, visual_tokens=2, bits=Bits(), prune_layer=1)
    fc1 = {x.name: x for x in layers if x.name.startswith("fc1")}
    assert fc1["fc1[full]"].count == 1 and fc1["fc1[full]"].ops == 2 * 5 * 8 * 16
    assert fc1["fc1[pruned]"].count == 1 and fc1["fc1[pruned]"].ops == 2 * 3 * 8 * 16
    unpruned = vision_layers(TINY, visual_tokens=4, bits=Bits(), prune_layer=1)
    assert [x.count for x in unpruned if x.name == "fc1[full]"] == [2]


def test_decode_eviction_caps_the_context():
    bits = Bits()
    full = decode_time(TINY, TOY_HW, bits, prompt_tokens=10, new_tokens=8)
    capped = decode_time(TINY, TOY_HW, bits, prompt_tokens=10, new_tokens=8, kv_budget=10)
    assert capped < full
    assert decode_time(TINY, TOY_HW, bits, 10, 8, kv_budget=100) == pytest.approx(full)
    step = totals(decode_layers(TINY, 10, bits, "deployment"), TOY_HW, bits).time
    assert capped == pytest.approx(8 * step)


def test_deployment_7b_on_4090_is_weight_bandwidth_bound_when_decoding():
    hw = hardware.get("rtx4090")
    r = deployment(PRESETS["llava-1.5-7b"], hw, "fp16", 576, 60, new_tokens=16)
    assert r["fits"]
    assert r["prefill_ms"] == pytest.approx(sum(r["prefill_ms_by_part"].values()), abs=1e-3)  # parts rounded to 1e-4
    # a decode step reads every text weight once: 6.74e9 params * 2 bytes at 1008 GB/s ~ 13.4 ms
    assert r["decode_ms_per_token"] == pytest.approx(6.74e9 * 2 / 1008e9 * 1e3, rel=0.05)
    # prefill of 636 tokens is compute-bound: at least 2 * 6.6e9 * 636 ops at 165.2 TFLOP/s
    assert r["prefill_ms_by_part"]["text"] > 2 * 6.6e9 * 636 / 165.2e12 * 1e3
    int4 = deployment(PRESETS["llava-1.5-7b"], hw, "int4", 576, 60, new_tokens=16)
    assert int4["decode_ms_per_token"] < r["decode_ms_per_token"] / 3
    assert int4["bits"] == {"weight": 4.125, "activation": 16, "kv": 16}  # one fp16 scale per 128 weights


def test_layer_table_attainable_is_under_the_roof():
    bits = deployed_bits("fp16")
    hw = hardware.get("a100-40g")
    for row in layer_table(prefill_layers(PRESETS["llava-1.5-7b"], 576, 60, bits, "deployment"), hw, bits):
        assert row["attainable_ops_per_s"] <= hw.fp16_ops + 1e-3
        assert row["attainable_ops_per_s"] == pytest.approx(min(hw.fp16_ops, row["intensity"] * hw.bandwidth))


def test_png_with_a_measured_point(tmp_path):
    bits = Bits()
    hw = hardware.get("a100-40g")
    rows = layer_table(prefill_layers(TINY, 2, 3, bits, "deployment"), hw, bits)
    out = write_png(tmp_path / "sub" / "roof.png", rows, [], hw, measured=[("measured prefill", 50.0, 3e13)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["roof.png"]  # no temporary file left


def test_measured_point_on_a_deployment_chart(tmp_path):
    hw = hardware.get("rtx4090")
    r = deployment(TINY, hw, "int8", visual_tokens=0, text_tokens=3, new_tokens=2)  # projector on 0 tokens
    label, intensity, ops_per_s = measured_point("measured", r["prefill_ops"], r["prefill_bytes"], seconds=2.0)
    assert intensity == r["prefill_ops"] / r["prefill_bytes"] and ops_per_s == r["prefill_ops"] / 2.0
    r = deployment(TINY, hw, "int8", 0, 3, 2, png=tmp_path / "roof.png", measured=[(label, intensity, ops_per_s)])
    assert (tmp_path / "roof.png").is_file() and r["png"] == str(tmp_path / "roof.png")


def test_cpu_micro_benchmark_tiny_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cpu.json"
    hw = hardware.cpu(cache_path=cache, k=64, prefill_m=8, stream_mb=1, copy_mb=1, repeats=1)
    assert hw.kind == "cpu" and hw.fp16_ops > 0 and hw.int8_ops > 0 and hw.int4_ops > 0 and hw.act_bits == 32
    kernels = hw.measured["kernels"]
    assert hw.bandwidth == max([hw.measured["copy_bytes_per_s"]] + [r["weight_bytes_per_s_m1"] for r in kernels.values()])
    # each weight format is held to its own kernel's peak (no measured point above its roof)
    assert (hw.peak_ops(32, 32, 32), hw.peak_ops(8, 32, 32), hw.peak_ops(4, 32, 32)) == (
        kernels["fp32"]["ops_per_s"], kernels["int8"]["ops_per_s"], kernels["int4"]["ops_per_s"])
    # and to its kernel's streaming rate at M = 1 (int4 with its scales is 4.125 bits)
    assert (hw.memory_rate(32), hw.memory_rate(8), hw.memory_rate(4.125)) == tuple(
        kernels[f]["weight_bytes_per_s_m1"] for f in ("fp32", "int8", "int4"))
    assert hardware.get("rtx4090").memory_rate(4) == hardware.get("rtx4090").bandwidth
    assert json.loads(cache.read_text())["hardware"]["bandwidth"] == hw.bandwidth

    def no_measure(**kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(hardware, "measure_cpu", no_measure)
    assert hardware.cpu(cache_path=cache) == hw


def test_cli_roofline_deployment_json(capsys):
    from vtprune.cli import main

    assert main(["roofline", "--preset", "llava-1.5-13b", "--hardware", "h100", "--precision", "int8",
                 "--new-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["hardware"] == "h100" and r["bits"]["weight"] == 8 and r["fits"]
    assert r["total_ms"] > r["prefill_ms"] > 0


def test_cli_roofline_errors(capsys):
    from vtprune.cli import main

    assert main(["roofline", "--hardware", "tpu", "--json"]) == 2
    assert capsys.readouterr().err.startswith("vtprune: error: --hardware: invalid choice: 'tpu' (choose from 'a100-40g'")  # parse time
    assert main(["roofline", "--precision", "int2", "--json"]) == 2
    assert "--precision" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_roofs_kernel_graphs_compute_the_product_of_their_weights(fmt):
    """The chains the CPU roof times are real matmuls: one layer's output equals x @ W for W dequantized by hand
    (int4: nibbles around 8 times the block scale; int8: per-channel scale), within the activation quantization."""
    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper

    from vtprune.benchmarks.kernels import BLOCK, chain_model

    k = 2 * BLOCK  # two int4 blocks per row
    model = chain_model(fmt, k, layers=1)
    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if fmt == "int4":
        packed = t["w0"].reshape(k, -1)  # [N, K / 2]
        nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(k, k).astype(np.float32) - 8  # [N, K]
        w = (nibbles * np.repeat(t["w0_scale"], BLOCK, axis=1)).T  # [K, N]
    else:
        w = t["w0"].astype(np.float32) * t["w0_scale"]  # [K, N], scale per output channel
    x = np.random.default_rng(0).standard_normal((3, k), dtype=np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, atol=0.05 * np.abs(x @ w).max())


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_the_roofs_chain_holds_different_bytes_in_every_layer(fmt):
    """With the same bytes in every layer ONNX Runtime streamed int4 and int8 chains at twice a memory copy's rate
    (it read one copy): each layer's weight must differ from every other's, and the pass's M is fixed."""
    from onnx import numpy_helper

    from vtprune.benchmarks.kernels import BLOCK, chain_model

    model = chain_model(fmt, 2 * BLOCK, layers=3, m=1)
    weights = [numpy_helper.to_array(i).tobytes() for i in model.graph.initializer if i.name in ("w0", "w1", "w2")]
    assert len(weights) == 3 and len(set(weights)) == 3
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
