"""The streaming exporter (export/streaming.py): graphs traced on fake weights, weights streamed from the
checkpoint, equal to what exporting the loaded model with its data gives."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from decoder_graphs import exported_with_data, prefill_feed
from vtprune.errors import UserError
from vtprune.export.bundle import export_bundle
from vtprune.export.decoder import export_decoder
from vtprune.export.streaming import fake_llava
from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava
from vtprune.models.weights import CheckpointWeights


def test_decoder_from_fake_weights_equals_the_exporters_graph(tiny_llava_dir):
    """Same nodes in the same order with the same names, same outputs: only where the weights come from differs."""
    loaded = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig())
    reference = exported_with_data(loaded)
    weights = CheckpointWeights.open(tiny_llava_dir)
    streamed = export_decoder(fake_llava(tiny_llava_dir, PruneConfig()), read=weights.tensor)
    assert [(n.op_type, n.name) for n in streamed.graph.node] == [(n.op_type, n.name) for n in reference.graph.node]
    a = ort.InferenceSession(streamed.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = loaded.config.text_config
    feed = prefill_feed(a, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    for x, y in zip(a.run(None, feed), b.run(None, feed)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_fake_model_allocates_no_weight(tiny_llava_dir):
    from torch._subclasses.fake_tensor import FakeTensor

    model = fake_llava(tiny_llava_dir, PruneConfig())
    assert all(isinstance(p, FakeTensor) for p in model.hf.parameters())


@pytest.fixture(scope="module")
def streamed_bundles(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint exported twice with fp16: weights inline, and streamed into external data."""
    root = tmp_path_factory.mktemp("streamed")
    inline = root / "inline"
    external = root / "external"
    export_bundle(tiny_llava_dir, inline, PruneConfig(), fp16=True)
    export_bundle(tiny_llava_dir, external, PruneConfig(), fp16=True, threshold_mb=0.001)
    return inline, external


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_streamed_external_data_runs_like_inline(streamed_bundles, tiny_image, precision):
    from vtprune.models.preprocess import preprocess_file
    from vtprune.runtime.generate import Pipeline

    inline, external = streamed_bundles
    m = json.loads((external / "manifest.json").read_text())
    for graph in ("vision", "decoder"):
        assert m["graphs"][graph][precision]["external_data"], graph  # streamed, not inline
    outs = []
    for bundle in (inline, external):
        from vtprune.runtime.bundle import Bundle

        pipe = Pipeline(Bundle.open(bundle), precision, "cpu", threads=1)
        pixels = preprocess_file(tiny_image, pipe.preprocess)
        result = pipe.generate(pipe.tokenizer.build("what is in the image ?", pipe.template), pixels, max_new_tokens=12,
                               stop_at_eos=False)
        outs.append(result)
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].visual_tokens_kept == outs[1].visual_tokens_kept


def _legacy_sharded(src, dst):
    """The tiny checkpoint re-saved as llava-hf stores LLaVA-1.5: legacy names, two shards and an index."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vtprune.models.weights import legacy_name

    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copyfile(src / name, dst / name)
    tensors = {legacy_name(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(dst / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_legacy_sharded_layout_exports_the_same_graph(tiny_llava_dir, tmp_path):
    legacy = _legacy_sharded(tiny_llava_dir, tmp_path / "legacy")
    a = export_decoder(fake_llava(legacy, PruneConfig()), read=CheckpointWeights.open(legacy).tensor)
    b = export_decoder(fake_llava(tiny_llava_dir, PruneConfig()), read=CheckpointWeights.open(tiny_llava_dir).tensor)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    for x, y in zip(sorted(a.graph.initializer, key=lambda t: t.name), sorted(b.graph.initializer, key=lambda t: t.name)):
        assert x.name == y.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def test_index_that_disagrees_with_its_shards_is_refused(tiny_llava_dir, tmp_path):
    legacy = _legacy_sharded(tiny_llava_dir, tmp_path / "legacy")
    index = json.loads((legacy / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}[index["weight_map"][name]]
    index["weight_map"][name] = other
    (legacy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"model.safetensors.index.json: says tensor {name} is in {other}"):
        export_bundle(legacy, tmp_path / "out", PruneConfig())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_fault_mid_stream_leaves_nothing(tiny_llava_dir, tmp_path, monkeypatch, fault):
    """The disk fills (or Ctrl-C) while weights stream into external data: one clear error, no partial bundle."""
    from vtprune.export import streaming

    add, calls = streaming.DataWriter.add, []

    def failing_add(self, array):
        calls.append(1)
        if len(calls) == 3:
            raise fault
        return add(self, array)

    monkeypatch.setattr(streaming.DataWriter, "add", failing_add)
    expected = (UserError, "No space left on device") if isinstance(fault, OSError) else (KeyboardInterrupt, "")
    with pytest.raises(expected[0], match=expected[1]):
        export_bundle(tiny_llava_dir, tmp_path / "out", PruneConfig(), threshold_mb=0.001)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_int4_interrupted_leaves_the_bundle_as_it_was(tiny_llava_dir, tmp_path, monkeypatch):
    from vtprune.quant import nbits
    from vtprune.quant.quantize import quantize_graph
    from vtprune.runtime.bundle import Bundle

    out = tmp_path / "b"
    export_bundle(tiny_llava_dir, out, PruneConfig(), threshold_mb=0.001)
    before = sorted(p.name for p in out.iterdir())
    manifest = (out / "manifest.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nbits, "quantize_int4", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_graph(Bundle.open(out), "decoder", "int4", 32, None)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "manifest.json").read_text() == manifest


def test_fp16_checkpoint_weights_go_to_the_fp16_graph_without_a_second_conversion(tiny_llava_dir, tmp_path, monkeypatch):
    """A checkpoint stored in fp16 (as llava-hf ships LLaVA-1.5): the fp16 graph takes each weight from the shard as
    stored, so ORT's fp32 -> fp16 converter never runs on the fp32 data (25 of a 7B export's 35 minutes), and each
    fp16 weight equals its fp32 twin (the fast path picks the right tensor, transposed as the graph wants it)."""
    import shutil

    import onnxruntime.transformers.float16 as ort_fp16
    from safetensors.torch import load_file, save_file

    from vtprune.export.streaming import TensorReader

    half = tmp_path / "half"
    shutil.copytree(tiny_llava_dir, half)
    tensors = {k: v.half() for k, v in load_file(str(half / "model.safetensors")).items()}
    save_file(tensors, str(half / "model.safetensors"), metadata={"format": "pt"})
    converted = []
    convert = ort_fp16.convert_np_to_float16
    monkeypatch.setattr(ort_fp16, "convert_np_to_float16", lambda a, *args, **kw: converted.append(a.shape) or convert(a, *args, **kw))
    out = tmp_path / "bundle"
    export_bundle(half, out, PruneConfig(), fp16=True, threshold_mb=0.001)
    read = TensorReader(out)
    fp32 = {t.name: t for t in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.initializer}
    fp16 = [t for t in onnx.load(str(out / "decoder.fp16.onnx"), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL]
    assert fp16
    for t in fp16:
        a16, a32 = np.asarray(read(t)), np.asarray(read(fp32[t.name]))
        assert a16.dtype == np.float16
        np.testing.assert_array_equal(a16, a32.astype(np.float16))
    external_shapes = {tuple(t.dims) for t in fp16}
    assert not [s for s in converted if tuple(s) in external_shapes]
