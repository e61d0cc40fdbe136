"""The bundle folder: complete or absent, graphs checked, external data for large graphs, a manifest the
runtime can trust."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from vtprune.errors import UserError
from vtprune.export.bundle import export_bundle
from vtprune.models.config import PruneConfig
from vtprune.runtime.bundle import Bundle


def test_bundle_has_every_file_the_manifest_names(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    m = bundle.manifest
    assert m["format_version"] == 1 and m["opset"] == 24 and m["decoder_form"] == "fused"  # the defaults
    for graph in ("vision", "decoder"):
        path = bundle.graph(graph, "fp32")  # checksums verified
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {m["opset"]}  # one opset
        assert any(o.domain == "ai.vtprune" for o in model.opset_import)
        outputs = [o.name for o in model.graph.output]
        assert outputs == list(m["io"][graph]["outputs"])  # the io table is what the graph has
    assert not list(tiny_bundle.parent.glob(".tiny.partial-*"))


def test_existing_output_is_refused_and_untouched(tiny_llava_dir, tiny_bundle):
    before = sorted(p.name for p in tiny_bundle.iterdir())
    with pytest.raises(UserError, match="exists"):
        export_bundle(tiny_llava_dir, tiny_bundle, PruneConfig())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_interrupted_export_leaves_nothing(tiny_llava_dir, tmp_path, monkeypatch):
    import vtprune.export.bundle as bundle_module

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")  # a disk-full write

    monkeypatch.setattr(bundle_module, "write_manifest", fail)
    with pytest.raises(UserError, match="--out: could not write .* No space left on device"):  # one line, no traceback
        export_bundle(tiny_llava_dir, tmp_path / "b", PruneConfig())
    assert list(tmp_path.iterdir()) == []


def test_external_data_path(tiny_llava_dir, tmp_path):
    """Graphs over the threshold (2 GB by default; lowered here) keep their weights in `<graph>.data`."""
    out = tmp_path / "ext"
    manifest = export_bundle(tiny_llava_dir, out, PruneConfig(), threshold_mb=0.01)
    for graph in ("vision", "decoder"):
        entry = manifest["graphs"][graph]["fp32"]
        assert entry["external_data"] == f"{graph}.onnx.data" and (out / entry["external_data"]).stat().st_size > 0
        assert (out / entry["file"]).stat().st_size < (out / entry["external_data"]).stat().st_size
    from vtprune.runtime.generate import Pipeline

    Pipeline(Bundle.open(out))  # ONNX Runtime finds the external data next to the graph


def test_manifest_paths_stay_inside_the_bundle(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "evil"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["embed_tokens"]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside the bundle"):
        Bundle.open(copy).path(m["embed_tokens"]["file"])


def test_fp16_variants(tiny_llava_dir, tmp_path, tiny_image):
    """fp16 weights everywhere but Stage 1's front, which stays float32 end to end (no round trip through half
    precision), so the fp16 vision graph keeps the patches fp32 keeps."""
    from onnx import TensorProto

    from vtprune.export.fp16 import stage1_front
    from vtprune.runtime.generate import Pipeline
    from vtprune.models.preprocess import preprocess_file

    out = tmp_path / "fp16"
    manifest = export_bundle(tiny_llava_dir, out, PruneConfig(), fp16=True)
    for graph in ("vision", "decoder"):
        assert set(manifest["graphs"][graph]) == {"fp32", "fp16"}
        model = onnx.load(str(out / f"{graph}.fp16.onnx"))
        front = set(stage1_front(onnx.load(str(out / f"{graph}.onnx"))))
        assert bool(front) == (graph == "vision")
        readers = {t: n.name for n in model.graph.node for t in n.input}
        weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type != TensorProto.INT64]  # not ids
        half = [t for t in weights if t.data_type == TensorProto.FLOAT16]
        assert half and all(t.data_type == TensorProto.FLOAT16 for t in weights if readers[t.name] not in front)
        assert all(t.data_type == TensorProto.FLOAT for t in weights if readers[t.name] in front)
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.value_info)}
        types.update((t.name, t.data_type) for t in model.graph.initializer)
        for node in model.graph.node:  # the front reads float32 only
            if node.name in front:
                assert TensorProto.FLOAT16 not in {types.get(t) for t in node.input}, node.name
    fp32, fp16 = Pipeline(Bundle.open(out), "fp32"), Pipeline(Bundle.open(out), "fp16")
    pixels = preprocess_file(tiny_image, fp32.preprocess)
    e32, k32 = fp32.encode_image(pixels)
    e16, k16 = fp16.encode_image(pixels)
    np.testing.assert_array_equal(k16, k32)
    assert float(abs(e32 - e16).max()) < 5e-2
    prompt = fp32.tokenizer.build("what is red ?")
    assert len(fp16.generate(prompt, pixels, max_new_tokens=5, stop_at_eos=False).token_ids) == 5
