"""`vtprune quantize` on the tiny bundle: every variant written, checked and registered; the ai.vtprune
functions and Stage 1's score path kept float; dynamic k and eviction still working; logits near fp32."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vtprune.cli import build_parser, main
from vtprune.errors import UserError
from vtprune.models.config import PruneConfig
from vtprune.quant.quantize import activation_matmuls, score_path_nodes
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline
from vtprune.models.preprocess import preprocess, preprocess_file

VARIANTS = ["int8", "int8-static", "int4", "int4-b32"]
QUANT_OP = {"int8": "MatMulInteger", "int8-static": "DequantizeLinear", "int4": "MatMulNBits", "int4-b32": "MatMulNBits"}
FUNCTIONS = {"vision": {"LongTailSplit"}, "decoder": {"KVEvict"}}  # snapkv, the default: no PrefillSelect
# max |logits - fp32| / max |fp32 logits| on the same inputs_embeds, and the cosine between them (measured on the
# tiny random model over 4 images: int8 0.009-0.012, int8-static 0.008-0.012, int4 0.11-0.16, cosine >= 0.991;
# the limits leave about 2x headroom).
LOGIT_TOLERANCE = {"int8": (0.03, 0.999), "int8-static": (0.03, 0.999), "int4": (0.3, 0.98), "int4-b32": (0.3, 0.98)}


@pytest.fixture(scope="module")
def quantized(tiny_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("quant") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    for args in (["--precision", "int8"], ["--precision", "int8-static", "--calibration-samples", "3"],
                 ["--precision", "int4", "--graphs", "vision,decoder"],  # int4 leaves vision fp32 unless asked
                 ["--precision", "int4", "--block-size", "32", "--graphs", "vision,decoder"]):
        assert main(["quantize", "--bundle", str(bundle), "--json", *args]) == 0
    return bundle


def matmul_weights(model: onnx.ModelProto, op_type: str) -> dict[str, list[np.ndarray]]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: [inits[t] for t in n.input[1:] if t in inits] for n in model.graph.node if n.op_type == op_type}


def test_every_variant_is_written_checked_and_registered(quantized):
    bundle = Bundle.open(quantized)
    for precision in VARIANTS:
        for graph in ("vision", "decoder"):
            entry = bundle.manifest["graphs"][graph][precision]
            assert entry["file"] == f"{graph}.{precision}.onnx" and entry["precision"] == precision
            path = bundle.graph(graph, precision)  # the manifest's checksums verified here
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"][entry["file"]]
            onnx.checker.check_model(str(path), full_check=True)
            model, fp32 = onnx.load(path), onnx.load(bundle.graph(graph, "fp32"))
            assert any(n.op_type == QUANT_OP[precision] for n in model.graph.node)
            # the ai.vtprune functions are carried over untouched and still called
            assert {f.name for f in model.functions} == FUNCTIONS[graph]
            assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in fp32.functions]
            assert {n.op_type for n in model.graph.node if n.domain == "ai.vtprune"} == FUNCTIONS[graph]
    assert not [p.name for p in quantized.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_int4_by_default_leaves_the_vision_graph_at_fp32(tiny_bundle, tmp_path):
    """INT4 vision moves Stage 1's split point (benchmarks/results/*embedded-vision-k.json), so by default an
    int4 bundle quantizes the decoder only and runs the fp32 vision graph."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert main(["quantize", "--bundle", str(bundle), "--precision", "int4", "--json"]) == 0
    graphs = Bundle.open(bundle).manifest["graphs"]
    assert "int4" in graphs["decoder"] and "int4" not in graphs["vision"]
    assert Pipeline(Bundle.open(bundle), "int4", "cpu", threads=1).precision == {"vision": "fp32", "decoder": "int4"}


def test_quantizing_again_replaces_the_variant(quantized):
    before = json.loads((quantized / "manifest.json").read_text())
    assert main(["quantize", "--bundle", str(quantized), "--precision", "int8", "--graphs", "decoder"]) == 0
    after = Bundle.open(quantized).manifest
    assert after["graphs"]["decoder"]["int8"]["sha256"] == before["graphs"]["decoder"]["int8"]["sha256"]  # deterministic
    assert after["graphs"]["vision"] == before["graphs"]["vision"]
    assert sorted(after["graphs"]["decoder"]) == sorted(before["graphs"]["decoder"])


@pytest.mark.parametrize("precision, block", [("int4", 128), ("int4-b32", 32)])
def test_int4_weights_take_4_bits_plus_one_fp32_scale_per_block(quantized, precision, block):
    bundle = Bundle.open(quantized)
    graph = onnx.load(bundle.graph("decoder", "fp32"))
    fp32 = matmul_weights(graph, "MatMul")
    q4 = matmul_weights(onnx.load(bundle.graph("decoder", precision)), "MatMulNBits")
    fp32 = {name: w[0] for name, w in fp32.items() if w}  # weight MatMuls only
    head = {name: w[0].T for name, w in matmul_weights(graph, "Gemm").items()}  # the LM head, [N, K] stored
    assert len(head) == 1 and len(q4) == len(fp32) + 1 > 1
    fp32.update(head)
    expected = 0
    for w in fp32.values():
        K, N = w.shape
        blocks = math.ceil(K / block)
        expected += N * blocks * block // 2 + N * blocks * 4  # packed 4-bit values + fp32 scales, no zero points
    got = sum(a.nbytes for ws in q4.values() for a in ws)
    assert got == expected
    if block == 32:  # every K of the tiny model is a multiple of 32: 5 bits per weight instead of 32
        assert got / sum(w.nbytes for w in fp32.values()) == pytest.approx(5 / 32)


def test_score_path_is_found_and_stays_float(quantized):
    bundle = Bundle.open(quantized)
    fp32 = onnx.load(bundle.graph("vision", "fp32"))
    path = score_path_nodes(fp32)
    layer = bundle.manifest["prune"]["prune_layer"] - 1
    weights = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    float_matmuls = {n.name for n in fp32.graph.node if n.name in path and n.op_type == "MatMul" and n.input[1] in weights}
    assert float_matmuls == {f"head./vision_head/vision/encoder/layers.{layer}/self_attn/q_proj/MatMul",
                             f"head./vision_head/vision/encoder/layers.{layer}/self_attn/k_proj/MatMul"}
    assert score_path_nodes(onnx.load(bundle.graph("decoder", "fp32"))) == []  # no Stage 1 there
    source = {n.name: n for n in fp32.graph.node}
    for precision in VARIANTS:
        model = onnx.load(bundle.graph("vision", precision))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        for name in float_matmuls:  # same node, same float inputs as in fp32 (QDQ would have rewired them)
            assert list(nodes[name].input) == list(source[name].input)
            np.testing.assert_array_equal(inits[source[name].input[1]], weights[source[name].input[1]])


def test_attention_matmuls_stay_float(quantized):
    """QK^T and probs x V (the H2O scores are sums of those probabilities) are never quantized: the MatMuls of a
    decomposed attention, or the fused form's Attention op, stay as they are, fed the same tensors."""
    bundle = Bundle.open(quantized)
    for graph in ("vision", "decoder"):
        fp32 = onnx.load(bundle.graph(graph, "fp32"))
        names = activation_matmuls(fp32) + [n.name for n in fp32.graph.node if n.op_type == "Attention"]
        assert len(names) >= (bundle.manifest["model"]["num_layers"] if graph == "decoder" else 1)
        source = {n.name: n for n in fp32.graph.node}
        for precision in VARIANTS:
            nodes = {n.name: n for n in onnx.load(bundle.graph(graph, precision)).graph.node}
            for name in names:
                assert nodes[name].op_type == source[name].op_type and list(nodes[name].input) == list(source[name].input), (precision, name)


def test_quantized_vision_keeps_the_dynamic_k(quantized, tiny_image):
    import torch

    from vtprune.models.embedded.data import make_sample
    from vtprune.models.pruning import select_visual_tokens

    bundle = Bundle.open(quantized)
    ref = Pipeline(bundle, "fp32", "cpu", threads=1)
    images = [preprocess_file(tiny_image, ref.preprocess)] + [preprocess(make_sample("test", 0, i).image, ref.preprocess) for i in range(3)]
    for precision in ["int8", "int8-static", "int4"]:
        session = Pipeline(bundle, precision, "cpu", threads=1).vision
        ks = []
        for pixels in images:
            feed = {"pixel_values": pixels, "k_min": np.array(ref.prune.k_min, np.int64)}
            embeds, kept, scores = session.run(None, feed)
            _, _, scores_fp32 = ref.vision.run(None, feed)
            expected = select_visual_tokens(torch.from_numpy(scores), k_min=1).numpy()  # on the graph's own scores
            np.testing.assert_array_equal(kept, expected)
            assert embeds.shape[1] == kept.shape[1]
            np.testing.assert_allclose(scores, scores_fp32, atol=0.02 * np.abs(scores_fp32).max())
            ks.append(kept.shape[1])
        assert len(set(ks)) > 1, f"{precision}: every image kept {ks[0]} tokens; expected k to vary per image"


@pytest.mark.parametrize("precision", ["int8", "int8-static", "int4"])
def test_quantized_decoder_still_evicts(quantized, tiny_image, precision):
    pipe = Pipeline(Bundle.open(quantized), precision, "cpu", threads=1)
    prompt = pipe.tokenizer.build("what is red ?", pipe.template)
    prune = PruneConfig(heavy_budget=4, recent_budget=3)
    g = pipe.generate(prompt, preprocess_file(tiny_image, pipe.preprocess), prune, max_new_tokens=12, stop_at_eos=False)
    # the budget binds already at prefill: snapkv runs the whole prompt, then cuts the cache to 7
    assert g.prompt_tokens == prompt.length_with_image(g.visual_tokens_kept) > 7 and len(g.cache_lengths) == 11
    assert max(g.cache_lengths) <= 7 and g.cache_lengths[-1] == 7


@pytest.mark.parametrize("precision", VARIANTS)
def test_quantized_logits_stay_close_to_fp32(quantized, tiny_image, precision):
    bundle = Bundle.open(quantized)
    ref = Pipeline(bundle, "fp32", "cpu", threads=1)
    pipe = Pipeline(bundle, precision, "cpu", threads=1)
    embeds = ref.splice(ref.tokenizer.build("what is red ?", ref.template), ref.encode_image(preprocess_file(tiny_image, ref.preprocess))[0])
    L = embeds.shape[1]
    positions = np.arange(L)[None]
    logits_fp32 = ref.step(embeds, positions, ref.empty_cache(), (L, L))[0][0]  # [V]
    logits = pipe.step(embeds, positions, pipe.empty_cache(), (L, L))[0][0]
    rel = np.abs(logits - logits_fp32).max() / np.abs(logits_fp32).max()
    cos = float(logits @ logits_fp32 / np.linalg.norm(logits) / np.linalg.norm(logits_fp32))
    max_rel, min_cos = LOGIT_TOLERANCE[precision]
    assert rel <= max_rel and cos >= min_cos, f"{precision}: max rel diff {rel:.4f} (<= {max_rel}), cosine {cos:.5f} (>= {min_cos})"


def test_report_lists_every_variant(quantized, tmp_path):
    out = tmp_path / "report"
    assert main(["quantize", "--bundle", str(quantized), "--report", "--limit", "2", "--out", str(out), "--json"]) == 0
    report = json.loads((out / "quantization.json").read_text())
    assert (out / "quantization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(report["variants"]) == ["fp32"] + sorted(VARIANTS)
    for precision, v in report["variants"].items():
        for graph in ("vision", "decoder"):
            name = f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
            assert v["bytes"][graph] == (quantized / name).stat().st_size
        assert 0 <= v["accuracy"] <= 100 and set(v["accuracy_by_kind"]) == {"exist", "count"}  # samples 0, 1
        assert v["decode_tokens_per_s"] > 0 and v["visual_tokens_kept_mean"] >= 1
    assert report["variants"]["fp32"]["same_answer_as_fp32"] == 1.0 and report["variants"]["fp32"]["same_k_as_fp32"] == 1.0
    assert {(t["variant"], t["what"].split()[0]) for t in report["targets"]} >= {("int8", "accuracy"), ("int4", "decoder")}


def test_tensorrt_without_a_gpu_is_one_line_and_exit_2(quantized, capsys):
    from vtprune.quant.tensorrt import nvidia_gpu_present

    if nvidia_gpu_present():
        pytest.skip("an NVIDIA GPU is present")
    before = (quantized / "manifest.json").read_text()
    assert main(["quantize", "--bundle", str(quantized), "--precision", "trt-fp16"]) == 2
    err = capsys.readouterr().err
    assert err == ("vtprune: error: --precision: trt-fp16 needs an NVIDIA GPU with TensorRT "
                   "(pip install vtprune[tensorrt]); none here\n")
    assert (quantized / "manifest.json").read_text() == before


def test_an_unknown_precision_is_refused_at_parse_time(quantized, capsys):
    assert main(["quantize", "--bundle", str(quantized), "--precision", "int3"]) == 2
    assert capsys.readouterr().err.startswith("vtprune: error: --precision: invalid choice: 'int3' (choose from 'int8'")


@pytest.mark.parametrize("args, where", [
    (["--precision", "int8", "--graphs", "vision,text"], "--graphs"),
    ([], "--precision"),
    (["--precision", "int8", "--block-size", "32"], "--block-size"),
])
def test_bad_options_are_refused(quantized, args, where):
    from vtprune.quant.quantize import main as quantize_main

    ns = build_parser().parse_args(["quantize", "--bundle", str(quantized), *args])
    with pytest.raises(UserError) as e:
        quantize_main(ns)
    assert e.value.where == where


def test_report_prints_its_table_and_files(quantized, tmp_path, capsys):
    """Without --json the report is a table on stdout (one row per variant, as in quantization.json) and its paths."""
    out = tmp_path / "report"
    assert main(["quantize", "--bundle", str(quantized), "--report", "--limit", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((out / "quantization.json").read_text())
    rows = {line.split()[0]: line.split() for line in printed[1:] if line.split() and line.split()[0] in report["variants"]}
    assert set(rows) == set(report["variants"])
    for name, v in report["variants"].items():
        assert float(rows[name][2]) == pytest.approx(v["accuracy"], abs=0.05)
    assert f"wrote {out / 'quantization.json'}" in printed and f"wrote {out / 'quantization.png'}" in printed


def test_int8_prefill_beside_int4_decode(quantized, tiny_image, capsys):
    """`prefill_precision`: the prompt (image and text) runs on the int8 graphs, every decode step on int4; the
    answer is the one made by hand from those sessions, the int4 session never sees the prompt."""
    bundle = Bundle.open(quantized)
    mixed = Pipeline(bundle, "int4", "cpu", threads=1, prefill_precision="int8")
    assert mixed.precision == {"vision": "int8", "decoder": "int4"} and "int8" in bundle.manifest["graphs"]["vision"]
    int8, int4 = Pipeline(bundle, "int8", "cpu", threads=1), Pipeline(bundle, "int4", "cpu", threads=1)
    pixels = preprocess_file(tiny_image, mixed.preprocess)
    prompt = mixed.tokenizer.build("what is red ?", mixed.template)
    prune = PruneConfig(heavy_budget=5, recent_budget=3)
    got = mixed.generate(prompt, pixels, prune, max_new_tokens=10, stop_at_eos=False)
    embeds = int8.splice(prompt, int8.encode_image(pixels)[0])
    budget = (5, 3)
    logits, _, cache = int8.prefill(embeds, 0, int8.empty_cache(), budget)
    tokens, _, _ = int4.decode(logits, cache, embeds.shape[1], budget, 10, stop_at_eos=False)
    assert got.token_ids == tokens
    same = Pipeline(bundle, "int4", "cpu", threads=1, prefill_precision="int4")
    assert mixed.prefill_decoder is not mixed.decoder and same.prefill_decoder is same.decoder  # no second session
    assert main(["run", "--bundle", str(quantized), "--precision", "int4", "--prefill-precision", "int8", "--image", str(tiny_image),
                 "--prompt", "what is red ?", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"]["decoder"] == "int4" and out["precision"]["decoder_prefill"] == "int8"
    assert main(["run", "--bundle", str(quantized), "--precision", "int4", "--prefill-precision", "int2", "--image", str(tiny_image),
                 "--prompt", "what is red ?", "--json"]) == 2
    assert "--prefill-precision" in capsys.readouterr().err
