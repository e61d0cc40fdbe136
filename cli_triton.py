"""`vtprune triton --bundle B --out DIR`: a Triton Inference Server model repository made from a bundle.

    DIR/vtprune_vision/config.pbtxt, 1/model.onnx      the vision graph, ONNX Runtime backend (Stage 1 inside)
    DIR/vtprune_decoder/config.pbtxt, 1/model.onnx     the decoder graph, ONNX Runtime backend (Stage 2 inside)
    DIR/vtprune_generate/config.pbtxt, 1/model.py      a Python-backend (BLS) model that runs the generation loop:
        1/embed_tokens.npy, 1/vtprune.json             vision -> splice -> prefill -> decode, one streamed
                                                       response per token (decoupled transaction policy)

The graphs are copied as they are (their `ai.vtprune` functions are made of standard ops, so the ONNX Runtime
backend needs no plugin). Each config is built from the graph's own inputs and outputs (names, types, dims) and
checked against Triton's ModelConfig schema (`tritonclient`'s model_config_pb2, parsed with protobuf's text_format)
when that package is installed. What is NOT tested here: a running tritonserver (no container, no GPU on this
machine). `model.py` is run in the tests against a stand-in for `triton_python_backend_utils` whose BLS calls run
the same two graphs in ONNX Runtime, and gives `vtprune run`'s tokens.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from vtprune.errors import UserError

VISION, DECODER, GENERATE = "vtprune_vision", "vtprune_decoder", "vtprune_generate"
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}
NUMPY_TYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_BOOL": "bool"}


def main(args) -> dict:
    from vtprune.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    if bundle.manifest.get("decoder_form") == "inplace":  # Triton's ONNX backend allocates every output itself
        raise UserError("--bundle", "its decoder is the in-place form, whose cache Triton's ONNX backend cannot bind in "
                                    "place; export the bundle with --decoder-form portable (or ort) for Triton")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError("--out", f"{out} exists and is not empty; expected a new folder for the model repository")
    if args.instances < 1:
        raise UserError("--instances", f"expected an integer >= 1, got {args.instances}")
    written = write_repository(bundle, out, args.precision, args.kind, args.instances)
    if not args.json:
        print(f"wrote {out}: {', '.join(written['models'])} (config.pbtxt checked: {written['validated_with']})")
    return written


# ------------------------------------------------------------------------------------------------ configs
def graph_io(path: Path) -> tuple[list[tuple], list[tuple]]:
    """(name, Triton type, dims) of a graph's inputs and outputs, read from the protobuf without its weights.
    Symbolic dims are -1; an initializer that is also an input (k_min) is an optional input."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def rows(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TYPES:
                raise UserError(str(path), f"{v.name} has ONNX type {t.elem_type}, which this writer does not map to Triton")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, ONNX_TYPES[t.elem_type], dims, v.name in init))
        return out

    return rows(model.graph.input), rows(model.graph.output)


def tensor_block(kind: str, rows: list[tuple]) -> str:
    """`input [...]` / `output [...]`; a scalar is sent as dims [1] and reshaped to [] (Triton's way for 0-d)."""
    items = []
    for name, dtype, dims, optional in rows:
        item = f'  {{\n    name: "{name}"\n    data_type: {dtype}\n'
        if dims:
            item += f"    dims: [ {', '.join(map(str, dims))} ]\n"
        else:
            item += "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n"
        if optional and kind == "input":
            item += "    optional: true\n"
        items.append(item + "  }")
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def onnx_config(name: str, inputs, outputs, kind: str, instances: int) -> str:
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\n'
        "# Batch 1: k differs per image (Stage 1) and the cache length per sequence (Stage 2), so requests are not\n"
        "# batched along dim 0; scale with instances (instance_group) and GPUs instead.\n"
        "max_batch_size: 0\n"
        + tensor_block("input", inputs) + tensor_block("output", outputs)
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    )


def generate_config(kind: str, instances: int) -> str:
    rows_in = [("input_ids", "TYPE_INT64", [-1], False), ("pixel_values", "TYPE_FP32", [1, 3, -1, -1], False),
               ("max_tokens", "TYPE_INT32", [1], True), ("temperature", "TYPE_FP32", [1], True),
               ("top_p", "TYPE_FP32", [1], True), ("seed", "TYPE_INT64", [1], True)]
    rows_out = [("token_id", "TYPE_INT64", [1], False)]
    return (
        f'name: "{GENERATE}"\nbackend: "python"\nmax_batch_size: 0\n'
        "# One response per generated token, then an empty final one: a decoupled (streaming) model.\n"
        "model_transaction_policy {\n  decoupled: true\n}\n"
        + tensor_block("input", rows_in) + tensor_block("output", rows_out)
        + f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    )


def model_config_schema():
    """Triton's ModelConfig protobuf class from tritonclient, or None. Loaded from its file, since importing
    tritonclient.grpc also needs grpcio, which a schema check does not."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("vtprune_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def validate(text: str, where: str):
    """Parse a config.pbtxt with Triton's own schema (unknown fields, bad enums and types fail); returns the message."""
    from google.protobuf import text_format

    schema = model_config_schema()
    if schema is None:
        return None
    try:
        return text_format.Parse(text, schema())
    except text_format.ParseError as e:
        raise UserError(where, f"not a valid Triton ModelConfig: {e}") from None


# ------------------------------------------------------------------------------------------------ the repository
def write_repository(bundle, out: Path, precision: str = "fp32", kind: str = "KIND_GPU", instances: int = 1) -> dict:
    """Write the three models into `out` (built in a temporary folder beside it, renamed when complete)."""
    from vtprune.runtime.generate import sample

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        configs = {}
        for model, which in ((VISION, "vision"), (DECODER, "decoder")):
            graph = bundle.graph(which, precision)
            entry = bundle.manifest["graphs"][which][precision]
            version = tmp / model / "1"
            version.mkdir(parents=True)
            shutil.copyfile(graph, version / "model.onnx")
            for name in entry.get("sha256", {}):  # external data files keep their names beside the graph
                if name != entry["file"]:
                    shutil.copyfile(bundle.path(name), version / Path(name).name)
            inputs, outputs = graph_io(graph)
            configs[model] = onnx_config(model, inputs, outputs, kind, instances)
        configs[GENERATE] = generate_config(kind, instances)
        version = tmp / GENERATE / "1"
        version.mkdir(parents=True)
        shutil.copyfile(bundle.path(bundle.manifest["embed_tokens"]["file"]), version / "embed_tokens.npy")
        m = bundle.manifest
        decoder_inputs = [row[0] for row in graph_io(bundle.graph("decoder", precision))[0]]
        meta = {"model": m["model"], "prune": m["prune"], "eos_token_id": m.get("generation", {}).get("eos_token_id"),
                "image_token_id": m["model"].get("image_token_id"), "decoder_inputs": decoder_inputs,
                "vision_model": VISION, "decoder_model": DECODER}
        (version / "vtprune.json").write_text(json.dumps(meta, indent=1))
        (version / "model.py").write_text(MODEL_PY.replace("# {sample}", inspect.getsource(sample)))
        validated = []
        for model, text in configs.items():
            where = str(out / model / "config.pbtxt")
            if validate(text, where) is not None:
                validated.append(model)
            (tmp / model / "config.pbtxt").write_text(text)
        if out.exists():
            out.rmdir()  # empty, checked by the caller
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repository": str(out), "models": list(configs), "precision": precision,
            "validated_with": "tritonclient model_config.proto" if len(validated) == 3 else "not validated (pip install tritonclient)",
            "tested_on_tritonserver": False}


MODEL_PY = '''"""vtprune's generation loop as a Triton Python-backend (BLS) model, written by `vtprune triton`.

Per request: vtprune_vision (Stage 1 inside) -> splice the k image embeddings at the image token -> vtprune_decoder
prefill -> one decoder call per token, the scored KV cache passed back in (past.* <- present.*; Stage 2's eviction
is inside the graph, so the cache stays at its budget). Each token goes out as its own response (decoupled mode).
Sampling is vtprune's own function, copied in, so a seed gives `vtprune run`'s tokens.
"""

import json
import math
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


# {sample}

class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        self.embed = np.load(here / "embed_tokens.npy", allow_pickle=False)  # [V, D]
        self.meta = json.loads((here / "vtprune.json").read_text())
        m = self.meta["model"]
        self.layers, self.heads, self.head_dim = m["num_layers"], m["num_kv_heads"], m["head_dim"]

    def budgets(self, prompt_len):
        """PruneConfig.budgets: ratios of the prompt length rounded half up, or absolute budgets."""
        p = self.meta["prune"]
        if not p["text"]:
            return self.meta["model"]["context_length"] + 1, 0
        heavy = p["heavy_budget"] if p["heavy_budget"] is not None else int(math.floor(p["heavy_ratio"] * prompt_len + 0.5))
        recent = p["recent_budget"] if p["recent_budget"] is not None else int(math.floor(p["recent_ratio"] * prompt_len + 0.5))
        return (heavy, recent) if heavy + recent >= 1 else (heavy, 1)

    def call(self, model, inputs, outputs):
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.generate(request, sender)
            except Exception as e:  # one failed request must not fail the others
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def generate(self, request, sender):
        def scalar(name, default, dtype):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return dtype(t.as_numpy().reshape(-1)[0]) if t is not None else default

        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).astype(np.int64)
        pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy().astype(np.float32)
        max_tokens = scalar("max_tokens", 64, int)
        temperature, top_p = scalar("temperature", 0.0, float), scalar("top_p", 1.0, float)
        rng = np.random.default_rng(scalar("seed", 0, int))
        where = np.flatnonzero(ids == self.meta["image_token_id"])
        if len(where) != 1:
            raise ValueError(f"expected exactly one image token in input_ids, found {len(where)}")
        i = int(where[0])
        p = self.meta["prune"]
        n = self.meta["model"]["num_patches"]
        vision = self.call(self.meta["vision_model"], {"pixel_values": pixels,
                                                       "k_min": np.array([p["k_min"] if p["visual"] else n], np.int64)},
                           ["image_embeds", "kept_index"])
        image = vision["image_embeds"][0].astype(self.embed.dtype)  # [k, D]
        tokens_embeds = self.embed[ids]  # [T, D]
        embeds = np.concatenate([tokens_embeds[:i], image, tokens_embeds[i + 1:]])[None]  # [1, L, D]
        L = embeds.shape[1]
        if L + max_tokens > self.meta["model"]["context_length"]:
            raise ValueError(f"the prompt is {L} tokens with the image; {max_tokens} more exceed the context")
        heavy, recent = self.budgets(L)
        cache = {}
        for layer in range(self.layers):
            cache[f"past.{layer}.key"] = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
            cache[f"past.{layer}.value"] = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
            cache[f"past.{layer}.score"] = np.zeros((1, self.heads, 0), np.float32)
        names = ["logits"] + [f"present.{layer}.{part}" for layer in range(self.layers) for part in ("key", "value", "score")]
        budgets = {"heavy_budget": np.array([heavy], np.int64), "recent_budget": np.array([recent], np.int64)}
        if "image_span" in self.meta["decoder_inputs"]:
            budgets["image_span"] = np.array([i, i + image.shape[0]], np.int64)

        def step(x, positions):
            out = self.call(self.meta["decoder_model"], {"inputs_embeds": x.astype(np.float32), "position_ids": positions,
                                                         **budgets, **cache}, names)
            cache.update({k.replace("present.", "past.", 1): v for k, v in out.items() if k.startswith("present.")})
            return out["logits"]

        logits = step(embeds, np.arange(L, dtype=np.int64)[None])
        position = L
        for t in range(max_tokens):
            token = sample(logits[0], temperature, top_p, rng)
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("token_id", np.array([token], np.int64))]))
            if token == self.meta["eos_token_id"] or t == max_tokens - 1:
                break
            logits = step(self.embed[[token]][None], np.array([[position]], np.int64))
            position += 1
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''
