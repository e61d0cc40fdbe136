"""`vtprune triton`: the model repository's configs parse with Triton's own ModelConfig schema, and its BLS
generation model, run against a stand-in for `triton_python_backend_utils` whose calls run the repository's graphs
in ONNX Runtime as its configs declare them, gives `vtprune run`'s tokens. A real tritonserver is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from vtprune.cli import main
from vtprune.cli_triton import DECODER, GENERATE, NUMPY_TYPES, VISION, model_config_schema
from vtprune.models.preprocess import preprocess_file
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline

from tiny_models import save_tiny_image

pytestmark = pytest.mark.skipif(model_config_schema() is None, reason="needs tritonclient (in [dev]) for the schema")


def parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_schema()())


class FakeBackend:
    """Just enough of triton_python_backend_utils: BLS requests run the repository's ONNX models, with each input
    checked against its config (type, dims with -1 free, `reshape`) and only the requested outputs returned."""

    def __init__(self, repo):
        import onnxruntime as ort

        self.models = {}
        for name in (VISION, DECODER):
            config = parse(repo / name / "config.pbtxt")
            self.models[name] = (ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]), config)
        self.calls = []
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class Error:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self.output_tensors, self.error_ = list(output_tensors), error

            def has_error(self):
                return self.error_ is not None

            def error(self):
                return self.error_

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                session, config = backend.models[self.model_name]
                backend.calls.append(self.model_name)
                declared = {i.name: i for i in config.input}
                feed = {}
                for t in self.inputs:
                    spec = declared[t.name()]  # an undeclared input would be refused by Triton
                    dtype = NUMPY_TYPES[model_config_schema()().DESCRIPTOR.fields_by_name["input"].message_type
                                        .fields_by_name["data_type"].enum_type.values_by_number[spec.data_type].name]
                    a = t.as_numpy()
                    assert a.dtype == np.dtype(dtype), (t.name(), a.dtype, dtype)
                    assert len(a.shape) == len(spec.dims) and all(d in (-1, s) for d, s in zip(spec.dims, a.shape)), (t.name(), a.shape)
                    feed[t.name()] = a.reshape(tuple(spec.reshape.shape)) if spec.HasField("reshape") else a
                missing = [n for n, spec in declared.items() if not spec.optional and n not in feed]
                assert not missing, missing
                out = dict(zip(self.outputs, session.run(self.outputs, feed)))
                return InferenceResponse([Tensor(k, v) for k, v in out.items()])

        def by_name(holder, name):
            tensors = holder.output_tensors if isinstance(holder, InferenceResponse) else holder.inputs
            return next((t for t in tensors if t.name() == name), None)

        self.module = types.SimpleNamespace(
            Tensor=Tensor, TritonError=Error, InferenceResponse=InferenceResponse, InferenceRequest=InferenceRequest,
            get_output_tensor_by_name=by_name, get_input_tensor_by_name=by_name, TRITONSERVER_RESPONSE_COMPLETE_FINAL=1)


class Request:
    def __init__(self, backend, inputs):
        self.inputs = [backend.module.Tensor(k, v) for k, v in inputs.items()]
        self.sent = []

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response=None, flags=0):
                request.sent.append((response, flags))

        return Sender()


def load_generate_model(repo, backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend.module)
    spec = importlib.util.spec_from_file_location("vtprune_triton_generate", repo / GENERATE / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = parse(repo / GENERATE / "config.pbtxt")
    model.initialize({"model_repository": str(repo / GENERATE), "model_version": "1", "model_config": json.dumps({"name": config.name})})
    return model


@pytest.fixture(scope="module")
def repository(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["triton", "--bundle", str(tiny_bundle), "--out", str(out), "--json"]) == 0
    return out


def test_configs_parse_with_tritons_schema_and_match_the_graphs(repository, tiny_bundle, capsys):
    import onnx

    for name, graph in ((VISION, "vision.onnx"), (DECODER, "decoder.onnx")):
        config = parse(repository / name / "config.pbtxt")
        assert config.backend == "onnxruntime" and config.max_batch_size == 0 and config.name == name
        model = onnx.load(str(repository / name / "1" / "model.onnx"), load_external_data=False)
        assert [i.name for i in config.input] == [i.name for i in model.graph.input]
        assert [o.name for o in config.output] == [o.name for o in model.graph.output]
        assert (repository / name / "1" / "model.onnx").read_bytes() == (tiny_bundle / graph).read_bytes()
    generate = parse(repository / GENERATE / "config.pbtxt")
    assert generate.backend == "python" and generate.model_transaction_policy.decoupled
    with pytest.raises(Exception, match="no_such_field"):  # the schema is strict: a typo would not pass
        from google.protobuf import text_format

        text_format.Parse((repository / VISION / "config.pbtxt").read_text() + "no_such_field: 1\n", model_config_schema()())


@pytest.mark.parametrize("temperature, top_p, seed", [(0.0, 1.0, 0), (0.9, 0.8, 7)])
def test_the_bls_generation_loop_gives_vtprunes_tokens(repository, tiny_bundle, tmp_path, monkeypatch, temperature, top_p, seed):
    backend = FakeBackend(repository)
    model = load_generate_model(repository, backend, monkeypatch)
    pipe = Pipeline(Bundle.open(tiny_bundle))
    for image_seed in range(3):
        pixels = preprocess_file(save_tiny_image(tmp_path / f"{image_seed}.png", seed=image_seed), pipe.preprocess)
        prompt = pipe.tokenizer.build("what is red ?", pipe.template)
        expected = pipe.generate(prompt, pixels, max_new_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
        request = Request(backend, {"input_ids": prompt.input_ids, "pixel_values": pixels,
                                    "max_tokens": np.array([12], np.int32), "temperature": np.array([temperature], np.float32),
                                    "top_p": np.array([top_p], np.float32), "seed": np.array([seed], np.int64)})
        backend.calls.clear()
        assert model.execute([request]) is None
        responses = [r for r, flags in request.sent if r is not None]
        assert request.sent[-1] == (None, 1)  # the final, empty response closes the stream
        assert not any(r.has_error() for r in responses)
        tokens = [int(r.output_tensors[0].as_numpy()[0]) for r in responses]
        assert tokens == expected.token_ids
        assert backend.calls == [VISION] + [DECODER] * len(tokens)  # one vision pass, then prefill + a call per token


def test_a_bad_request_is_an_error_response_not_a_crash(repository, tiny_bundle, monkeypatch):
    backend = FakeBackend(repository)
    model = load_generate_model(repository, backend, monkeypatch)
    request = Request(backend, {"input_ids": np.array([1, 5, 6], np.int64), "pixel_values": np.zeros((1, 3, 112, 112), np.float32)})
    model.execute([request])
    ((response, flags),) = request.sent
    assert flags == 1 and response.has_error() and "image token" in response.error().message()


def test_triton_refuses_a_non_empty_out_folder_in_one_line(repository, tiny_bundle, capsys):
    assert main(["triton", "--bundle", str(tiny_bundle), "--out", str(repository)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vtprune: error: --out: ")


def test_triton_refuses_an_inplace_bundle_in_one_line(tiny_inplace_bundle, tmp_path, capsys):
    assert main(["triton", "--bundle", str(tiny_inplace_bundle), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vtprune: error: --bundle: ") and not (tmp_path / "repo").exists()
