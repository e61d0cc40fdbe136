"""The Optimum peer: planned `unavailable` with why when its venv is missing, the graph surgery that lets its decoder
take inputs_embeds, and (slow, with the venv) the whole peer on the embedded model against transformers' tokens."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vtprune.benchmarks import bench, measure, optimum_build, optimum_peer
from vtprune.errors import UserError


def _plans(tmp_path, quick=False):
    model = SimpleNamespace(model_dir=tmp_path / "model", cache=tmp_path / "cache")
    return bench._optimum_plans(SimpleNamespace(quick=quick), model, tmp_path / "bundle", {"threads": 1}, 1e6,
                                lambda msg: None)


def test_without_its_venv_the_optimum_peer_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    venv = tmp_path / "no-venv"
    monkeypatch.setenv("VTPRUNE_OPTIMUM_VENV", str(venv))
    plans = _plans(tmp_path)
    assert [p["name"] for p in plans] == ["optimum-fp32", "optimum-int8"]
    for p in plans:
        assert str(venv) in p["unavailable"] and "vtprune bench --setup-peer" in p["unavailable"]
        assert "cmd" not in p and p["kind"] == "peer"
    assert not (tmp_path / "cache").exists()  # nothing was built
    assert all(p["unavailable"] == "skipped by --quick" for p in _plans(tmp_path, quick=True))


def test_a_venv_without_optimum_is_refused_with_the_import_error(tmp_path, monkeypatch):
    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("this Python has optimum: it cannot stand in for a venv without it")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "venv" / "bin" / "python")
    monkeypatch.setenv("VTPRUNE_OPTIMUM_VENV", str(tmp_path / "venv"))
    python, why = optimum_build.find_optimum()
    assert python is None and "cannot import optimum.onnxruntime" in why and "ModuleNotFoundError" in why
    assert all("cannot import optimum.onnxruntime" in p["unavailable"] for p in _plans(tmp_path))


def _decoder_like(table: np.ndarray, w: np.ndarray, extra_reader: bool = False) -> onnx.ModelProto:
    """input_ids [B, S] -> Gather(table) -> Mul by 2 -> MatMul(w) -> logits: the shape of Optimum's export around its
    embedding."""
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["/embed/Gather_output_0"], name="/embed/Gather"),
             helper.make_node("Mul", ["/embed/Gather_output_0", "two"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["logits"])]
    if extra_reader:
        nodes.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"]))
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", w.shape[1]])]
        + ([helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2])] if extra_reader else []),
        initializer=[numpy_helper.from_array(table, "embed.weight"), numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.float32(2), "two")],
        value_info=[helper.make_tensor_value_info("/embed/Gather_output_0", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_cut_decoder_takes_inputs_embeds_and_gives_the_same_logits():
    rng = np.random.default_rng(0)
    table, w = rng.standard_normal((11, 6)).astype(np.float32), rng.standard_normal((6, 11)).astype(np.float32)
    ids = np.array([[3, 0, 10, 3]], np.int64)
    original = ort.InferenceSession(_decoder_like(table, w).SerializeToString()).run(None, {"input_ids": ids})[0]
    cut, cut_table = optimum_build.inputs_embeds_graph(_decoder_like(table, w))
    onnx.checker.check_model(cut, full_check=True)
    assert np.array_equal(cut_table, table)
    assert [i.name for i in cut.graph.input] == ["inputs_embeds"]
    dims = [d.dim_param or d.dim_value for d in cut.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "sequence_length", 6]
    assert "embed.weight" not in {t.name for t in cut.graph.initializer}  # nothing else read it
    got = ort.InferenceSession(cut.SerializeToString()).run(None, {"inputs_embeds": table[ids]})[0]
    np.testing.assert_array_equal(got, original)


def test_the_cut_is_refused_when_input_ids_feeds_more_than_the_embedding():
    rng = np.random.default_rng(0)
    proto = _decoder_like(rng.standard_normal((11, 6)).astype(np.float32), rng.standard_normal((6, 11)).astype(np.float32),
                          extra_reader=True)
    with pytest.raises(UserError, match="one token-embedding Gather only"):
        optimum_build.inputs_embeds_graph(proto)


def test_transformers4_config_lifts_rope_theta_out_of_rope_parameters():
    v5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    assert optimum_build.transformers4_config(v5)["rope_theta"] == 500000.0
    assert "rope_scaling" not in optimum_build.transformers4_config(v5)
    scaled = {"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}
    assert optimum_build.transformers4_config(scaled)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_the_worker_speaks_the_bench_progress_prefix():
    assert optimum_peer.PROGRESS == measure.PROGRESS  # the worker cannot import vtprune: the constant is copied


def test_ratios_against_optimum_int8():
    def system(name, prefill, ttft, rate):
        return {"name": name, "status": "ok", "measured_over_roofline": {"prefill_ms": 1.0, "decode_tokens_per_s": {"8": 1.0}},
                "measured": {"prefill_ms": prefill, "ttft_ms": ttft, "decode_tokens_per_s": {"8": rate}}}

    ratios, headline = bench.compute_ratios([system("vtprune-int8", 10.0, 20.0, 50.0),
                                             system("optimum-int8", 40.0, 60.0, 25.0),
                                             system("optimum-fp32", 80.0, 90.0, 10.0)], "8")
    assert headline == "vtprune-int8"
    assert ratios["prefill_vs_optimum"] == 4.0 and ratios["ttft_vs_optimum"] == 3.0 and ratios["decode_vs_optimum"] == 2.0
    assert ratios["ttft_vs_genai"] is None


@pytest.mark.slow
def test_optimum_peer_on_the_embedded_model_gives_transformers_tokens(tmp_path):
    """Builds the Optimum peer (optimum-cli export, the cut, ORTQuantizer) on the shipped embedded checkpoint and runs
    it as the bench does: fp32 gives transformers' greedy tokens on one sample; int8 runs the full length."""
    import torch

    from vtprune.models.loading import default_model_dir, load_llava
    from vtprune.runtime.bundle import Bundle

    python, why = optimum_build.find_optimum()
    if python is None:
        pytest.skip(why)
    model_dir = default_model_dir()
    bundle = model_dir.parent / "bundle"
    model = SimpleNamespace(model_dir=model_dir, cache=tmp_path / "cache")
    n, new_tokens = 576, 16
    samples = bench.write_samples(tmp_path / "samples.npz", bundle, Bundle.open(bundle).manifest, 1, n)
    spec = {"samples": str(samples["path"]), "threads": 1, "repeats": 1, "new_tokens": new_tokens, "warmup_tokens": 2}
    plans = {p["name"]: p for p in bench._optimum_plans(SimpleNamespace(quick=False), model, bundle, spec, 1e6, print)}
    build = json.loads((tmp_path / "cache" / "optimum" / "build.json").read_text())
    assert build["variants"]["int8"] and "error" not in build["quantize"], build["quantize"]
    seen = []
    tokens = {}
    for name in ("optimum-fp32", "optimum-int8"):
        assert "unavailable" not in plans[name], plans[name].get("unavailable")
        raw = bench.run_worker(plans[name]["cmd"], plans[name]["spec"], tmp_path / name, 1, on_progress=seen.append)
        assert "error" not in raw, raw
        run = raw["runs"][0]
        assert run["visual_tokens"] == n and len(run["tokens"]) == len(run["token_ms"]) == new_tokens
        assert run["ttft_ms"] == pytest.approx(run["vision_ms"] + run["prefill_ms"])
        assert raw["versions"]["optimum-onnx"] and raw["tree_peak_rss_mb"] > 0
        tokens[name] = run["tokens"]
    assert any(line.startswith("warm-up done") for line in seen)

    torch.set_num_threads(1)
    hf = load_llava(model_dir, dtype=torch.float32)
    data = np.load(samples["path"])
    ids = torch.from_numpy(data["expanded_ids_0"]).unsqueeze(0)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=torch.from_numpy(data["pixel_values_0"]), attention_mask=torch.ones_like(ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert tokens["optimum-fp32"] == out[0, ids.shape[1]:].tolist()
