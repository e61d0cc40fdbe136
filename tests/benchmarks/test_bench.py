"""`vtprune bench`: the quick run end to end on a tiny model, and the pieces it is built from."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from vtprune.benchmarks import bench_graphs
from vtprune.benchmarks.summary import decode_tokens_per_s, summarize
from vtprune.cli import main
from vtprune.export import split_op


def test_quick_bench_runs_end_to_end_with_the_keys(tiny_llava_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the bundle and the CPU figures go here
    out = tmp_path / "results"
    assert main(["bench", "--quick", "--json", "--model", str(tiny_llava_dir), "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout: the one JSON object; progress went to stderr
    progress = [line for line in captured.err.splitlines() if line.startswith("bench: ")]
    for name, label in (("transformers", "transformers eager fp32"), ("vtprune-fp32", "vtprune fp32")):
        measuring = next(i for i, line in enumerate(progress) if line.startswith(f"bench: measuring {label}"))
        warm = next(i for i, line in enumerate(progress) if line.startswith(f"bench: {name}: warm-up done"))
        done = rf"bench: {name}: sample 1/1, repeat 1/1, TTFT (\d+ ms|\d+\.\d\d s), 8 tokens at [\d.]+ tokens/s"
        run = next(i for i, line in enumerate(progress) if re.fullmatch(done, line))
        assert measuring < warm < run, progress  # in the order the worker got there, under its system's name
    assert not any("vtprune-bench-progress" in line for line in captured.err.splitlines())  # the prefix is removed
    assert printed["device"] == "cpu"
    for key in ("prefill_vs_transformers", "ttft_vs_genai", "decode_vs_genai", "prefill_measured_over_roofline",
                "decode_measured_over_roofline"):
        assert key in printed["ratios"]
    systems = {s["name"]: s for s in printed["systems"]}
    assert systems["genai-int4"]["status"] == "unavailable" and "--quick" in systems["genai-int4"]["reason"]
    hf, vt = systems["transformers"], systems["vtprune-fp32"]
    assert hf["status"] == vt["status"] == "ok"
    text_tokens = printed["workload"]["samples"][0]["text_tokens"]
    n = printed["k"]["num_patches"]
    assert n == 64  # the tiny checkpoint's 112 px / 14 px patches
    assert hf["measured"]["visual_tokens"] == n and hf["measured"]["total_tokens"] == n + text_tokens
    k = vt["measured"]["visual_tokens"]
    assert 1 <= k <= n and vt["measured"]["total_tokens"] == k + text_tokens
    for s in (hf, vt):
        m = s["measured"]
        assert m["ttft_ms"] == pytest.approx(m["vision_ms"] + m["prefill_ms"], rel=1e-3)
        assert m["decode_tokens_per_s"]["8"] > 0 and m["peak_rss_mb"] > 0
        assert s["roofline"]["prefill_ms"] > 0 and s["measured_over_roofline"]["prefill_ms"] > 0
    assert printed["ratios"]["prefill_vs_transformers"] == pytest.approx(
        hf["measured"]["prefill_ms"] / vt["measured"]["prefill_ms"], rel=1e-3)
    assert printed["ratios"]["ttft_vs_genai"] is None  # no peer in a quick run: no number is made up
    written = json.loads((out / printed["files"]["json"].split("/")[-1]).read_text())
    assert written["ratios"] == printed["ratios"] and written["systems"] == printed["systems"]
    for png in ("latency_png", "roofline_png"):
        assert open(printed["files"][png], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from vtprune.benchmarks.bench import rescore  # the same code on the same figures: the same rooflines and ratios

    again = rescore(Path(printed["files"]["json"]), "a test")  # from figures rounded to 5 digits: within 1e-3
    assert _close([s.get("roofline") for s in again["systems"]], [s.get("roofline") for s in written["systems"]])
    assert _close(again["ratios"], written["ratios"]) and again["notes"][-1].endswith("a test")
    assert again["files"]["json"] == printed["files"]["json"]


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    return a == pytest.approx(b, rel=1e-3) if isinstance(a, float) else a == b


WORKER = """
import json, os, sys, time
from pathlib import Path
from vtprune.benchmarks.measure import progress
print("a warning of the worker's own", file=sys.stderr, flush=True)
progress("sample 1/2")
go = Path(sys.argv[2]).with_name("go")
deadline = time.time() + 20
while not go.exists() and time.time() < deadline:  # the parent creates it on seeing the line above
    time.sleep(0.01)
if not go.exists():
    sys.exit("no progress seen while running")
progress("sample 2/2")
Path(sys.argv[2]).write_text(json.dumps({"runs": []}))
"""


def test_worker_progress_reaches_the_parent_while_the_worker_runs(tmp_path):
    """run_worker hands each progress line on as it is printed (the worker waits for the parent to see the first),
    and keeps the rest of the worker's stderr in stderr.txt, where a failure's last line is read."""
    from vtprune.benchmarks.bench import run_worker

    seen = []

    def on_progress(message):
        seen.append(message)
        (tmp_path / "w" / "go").touch()

    raw = run_worker([sys.executable, "-c", WORKER], {}, tmp_path / "w", 1, on_progress=on_progress)
    assert raw.get("runs") == [], raw
    assert seen == ["sample 1/2", "sample 2/2"]
    assert (tmp_path / "w" / "stderr.txt").read_text() == "a warning of the worker's own\n"
    failed = run_worker([sys.executable, "-c", "from vtprune.benchmarks.measure import progress\n"
                         "progress('loading'); raise SystemExit('bad spec')"], {}, tmp_path / "f", 1)
    assert failed == {"error": "bad spec"}  # the error is the last line that is not progress


def test_decode_rate_counts_the_steps_after_the_first_token():
    token_ms = [0.0, 100.0, 200.0, 300.0]  # first token at 0, then one every 100 ms
    assert decode_tokens_per_s(token_ms, 4) == pytest.approx(10.0)  # 3 steps in 0.3 s
    assert decode_tokens_per_s(token_ms, 2) == pytest.approx(10.0)
    assert decode_tokens_per_s(token_ms, 5) is None  # the run made only 4 tokens
    runs = [{"vision_ms": v, "prefill_ms": 10.0, "ttft_ms": v + 10, "token_ms": token_ms, "visual_tokens": 5,
             "prompt_tokens": 9} for v in (1.0, 3.0, 100.0)]
    s = summarize(runs, [4])
    assert s["vision_ms"] == 3.0 and s["ttft_ms"] == 13.0 and s["decode_tokens_per_s"]["4"] == pytest.approx(10.0)


def _split_graph(op_type: str) -> onnx.ModelProto:
    """scores [1, n] + k -> kept_index, through one ai.vtprune node (LongTailSplit or, after pin_k, FixedTopK)."""
    node = helper.make_node(op_type, ["scores", "k_min"], ["kept_index"], domain=split_op.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, None]),
                                            helper.make_tensor_value_info("k_min", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("kept_index", TensorProto.INT64, [1, None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(split_op.DOMAIN, 1)],
                             functions=[split_op.long_tail_split_function()])


def test_pin_k_keeps_exactly_the_k_highest_scores_in_spatial_order():
    model = bench_graphs.pin_k(_split_graph("LongTailSplit"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for k in (1, 5, 17):
        scores = rng.random((1, 40)).astype(np.float32)
        kept = session.run(None, {"scores": scores, "k_min": np.array(k, np.int64)})[0]
        assert kept.tolist() == [sorted(np.argsort(-scores[0], kind="stable")[:k].tolist())]
    flat = np.ones((1, 10), np.float32)  # a flat curve: the split would keep all 10; pinned, the first 3 by index
    assert session.run(None, {"scores": flat, "k_min": np.array(3, np.int64)})[0].tolist() == [[0, 1, 2]]
    big = session.run(None, {"scores": rng.random((1, 6)).astype(np.float32), "k_min": np.array(99, np.int64)})[0]
    assert big.tolist() == [[0, 1, 2, 3, 4, 5]]  # k is capped at n


def test_embedding_model_splices_the_image_rows_at_the_image_tokens():
    V, D, image_id = 10, 3, 9
    table = np.arange(V * D, dtype=np.float32).reshape(V, D)
    session = ort.InferenceSession(bench_graphs.embedding_model(table, image_id).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ids = np.array([[1, 9, 9, 9, 4]], np.int64)
    feats = -np.arange(3 * D, dtype=np.float32).reshape(3, D) - 1
    out = session.run(None, {"input_ids": ids, "image_features": feats})[0]
    expected = np.stack([table[1], feats[0], feats[1], feats[2], table[4]])[None]
    np.testing.assert_array_equal(out, expected)
    step = session.run(None, {"input_ids": np.array([[7]], np.int64), "image_features": np.zeros((0, D), np.float32)})[0]
    np.testing.assert_array_equal(step, table[[7]][None])  # a decode step: no image rows, plain lookup


def test_ratios_read_every_length_every_variant_and_the_targets_follow_them():
    """Decode against GenAI at each measured length, int4's and the mixed variant's prefill against int8's, the worst
    measured / roofline over the vtprune variants only, and the node ratio; a target with no value is unmet-unknown."""
    from vtprune.benchmarks import bench

    def system(name, prefill, rates, roof=(1.0, 1.0), kind="vtprune"):
        return {"name": name, "kind": kind, "status": "ok",
                "measured": {"prefill_ms": prefill, "ttft_ms": prefill + 10, "decode_tokens_per_s": rates},
                "measured_over_roofline": {"prefill_ms": roof[0], "decode_tokens_per_s": {"2048": roof[1]}}}

    systems = [system("vtprune-int4", 300.0, {"256": 12.0, "2048": 11.0}, (1.2, 1.4)),
               system("vtprune-int8", 100.0, {"256": 8.0, "2048": 7.5}, (1.1, 1.7)),
               system(bench.mixed_name("int4"), 110.0, {"256": 12.0, "2048": 11.0}, (1.0, 1.3)),
               system("genai-int4", 900.0, {"256": 10.0, "2048": 4.0}, (9.0, 9.0), kind="peer"),
               {"name": "optimum-int8", "status": "out_of_memory"}]
    ratios, headline = bench.compute_ratios(systems, "2048", {"vtprune": 500, "genai": 250})
    assert headline == bench.mixed_name("int4")  # the int4 decoder prefilling on int8, when both ran
    assert ratios["decode_vs_genai@256"] == pytest.approx(1.2) and ratios["decode_vs_genai@2048"] == pytest.approx(2.75)
    assert ratios["int4_prefill_over_int8"] == pytest.approx(3.0) and ratios["mixed_prefill_over_int8"] == pytest.approx(1.1)
    assert ratios["prefill_over_roofline_worst"] == pytest.approx(1.2)  # the peer's 9.0 is not vtprune's
    assert ratios["decode_over_roofline_worst"] == pytest.approx(1.7)
    assert ratios["decoder_nodes_vs_genai"] == pytest.approx(2.0) and ratios["decode_vs_optimum"] is None
    met = {k: v["met"] for k, v in bench.targets(ratios).items()}
    assert met["decode_vs_genai@256"] is False and met["decode_vs_genai@2048"] is True
    assert met["int4_prefill_over_int8"] is False and met["decode_over_roofline_worst"] is False
    assert met["decoder_nodes_vs_genai"] is True and met["decode_vs_optimum"] is None


def test_decoder_nodes_counts_the_top_level_graph_without_loading_weights(tmp_path):
    from vtprune.benchmarks.bench import decoder_nodes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])], "g", [x],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    (tmp_path / "m.data").write_bytes(b"")  # weights never read: an emptied data file does not matter
    assert decoder_nodes(tmp_path / "m.onnx") == 2
