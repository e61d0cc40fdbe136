"""`vtprune quantize` writes that lose nothing (issue 20): two at once on one bundle keep both variants, an
interrupt inside ONNX Runtime's quantizer leaves the bundle as it was (its `*-inferred.onnx` scratch included),
and staging folders of killed runs are removed by the next one. Real processes, the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_bad_inputs import snapshot

CLI = [sys.executable, "-m", "vtprune.cli"]


def registered_files(bundle: Path) -> set[str]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {name for variants in manifest["graphs"].values() for e in variants.values() for name in e["sha256"]}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_quantizes_at_once_keep_both_variants(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    runs = [subprocess.Popen([*CLI, "quantize", "--bundle", bundle, "--precision", p, "--graphs", "vision,decoder", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in ("int8", "int4")]
    outs = [r.communicate(timeout=600) for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0 and "Traceback" not in err, err[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for graph in ("vision", "decoder"):
        assert {"fp32", "int8", "int4"} <= set(manifest["graphs"][graph]), manifest["graphs"][graph].keys()
    on_disk = {p.name for p in bundle.iterdir()}
    graphs_on_disk = {n for n in on_disk if n.endswith((".onnx", ".data"))}
    assert graphs_on_disk == registered_files(bundle), graphs_on_disk ^ registered_files(bundle)  # no orphans
    assert not [n for n in on_disk if n.startswith(".")], on_disk  # no staging folder, no lock file


INTERRUPT_IN_ORT = """
import sys
from pathlib import Path
import onnx.shape_inference

def interrupted(src, dst, *a, **k):  # as a Ctrl-C while ORT writes its inferred copy beside the source
    Path(dst).write_bytes(b"half an inferred model")
    raise KeyboardInterrupt

onnx.shape_inference.infer_shapes_path = interrupted
from vtprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupt_inside_ort_leaves_the_bundle_as_it_was(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, "-c", INTERRUPT_IN_ORT, "quantize", "--bundle", str(bundle), "--precision", "int8-static",
                        "--calibration-samples", "1"],  # int8-static runs ORT's quantizer (int8 and int4 stream)
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert snapshot(tmp_path) == before  # no *-inferred.onnx, no staging folder, the manifest untouched


def test_next_quantize_removes_stale_staging_folders(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    pid = dead_pid()
    stale = [bundle / f".vision.int8.partial-{pid}-abc123", bundle / f".decoder.quantize-{pid}-x9"]
    for folder in stale:
        folder.mkdir()
        (folder / "vision.int8.onnx").write_bytes(b"half a graph")
    p = subprocess.run([*CLI, "quantize", "--bundle", bundle, "--precision", "int8", "--graphs", "vision", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not any(f.exists() for f in stale)


def test_next_export_removes_stale_partial_folders(tiny_llava_dir, tmp_path):
    """A SIGKILLed export leaves `.out.partial-<pid>-*`; the next export beside it removes it (its process is gone)."""
    pid = dead_pid()
    stale = tmp_path / f".out.partial-{pid}-abcd"
    stale.mkdir()
    (stale / "vision.onnx").write_bytes(b"half")
    alive = tmp_path / f".other.partial-{__import__('os').getpid()}-abcd"  # a running process's folder stays
    alive.mkdir()
    p = subprocess.run([*CLI, "export", "--model", tiny_llava_dir, "--out", tmp_path / "out2", "--opset", "99"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2  # refused at once (opset): nothing written, nothing cleaned before the checks pass
    assert stale.exists()
    p = subprocess.run([*CLI, "export", "--model", tiny_llava_dir, "--out", tmp_path / "out2"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not stale.exists() and alive.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([alive.name, "out2"])


def test_int8_of_a_graph_with_external_data(tiny_llava_dir, tiny_image, tmp_path):
    """The dynamic int8 variant of a bundle whose graphs keep their weights in external data (every graph over
    --external-data-threshold-mb): quantized (the fp32 files copied to the scratch folder, which onnx's checker
    accepts; hard links it refuses), registered, and answering like the int8 of the same graphs stored inline."""
    from vtprune.cli import main
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig
    from vtprune.models.preprocess import preprocess_file
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    answers = []
    for name, threshold in (("external", 0.001), ("inline", 256)):
        out = tmp_path / name
        export_bundle(tiny_llava_dir, out, PruneConfig(), threshold_mb=threshold)
        assert main(["quantize", "--bundle", str(out), "--precision", "int8", "--json"]) == 0
        bundle = Bundle.open(out)
        assert (bundle.manifest["graphs"]["decoder"]["fp32"]["external_data"] is not None) == (name == "external")
        pipe = Pipeline(bundle, "int8", "cpu", threads=1)
        prompt = pipe.tokenizer.build("what is red ?", pipe.template)
        answers.append(pipe.generate(prompt, preprocess_file(tiny_image, pipe.preprocess), max_new_tokens=8,
                                     stop_at_eos=False).token_ids)
    assert answers[0] == answers[1]
    assert not list((tmp_path / "external").glob(".*quantize*"))  # the scratch folder is gone
