"""The second peer: Hugging Face Optimum (optimum-onnx), found in its own venv, and its model folder built from the same weights.

optimum-onnx is never a vtprune dependency: 0.1.0 pins transformers < 4.58 (vtprune runs on 5.x). The bench
looks for a venv at $VTPRUNE_OPTIMUM_VENV or ~/.cache/vtprune/optimum-venv whose Python imports
`optimum.onnxruntime` (`vtprune bench --setup-peer` makes it); without it the peer is reported `unavailable`, with why.

The folder, <cache>/optimum/: `optimum-cli export onnx --task text-generation-with-past` on the LLaVA's text part
saved as a LlamaForCausalLM checkpoint (the one the GenAI peer reads, peer.text_checkpoint); its token-embedding
Gather cut out so the decoder takes `inputs_embeds` (inputs_embeds_graph), the cut table made the embedding graph
that splices the 576 image features in (benchmarks/bench_graphs.embedding_model), the unpruned vision graph, and
Optimum's own CPU quantization of that decoder: `ORTQuantizer` with `AutoQuantizationConfig.avx512_vnni(is_static=
False)` (dynamic int8). benchmarks/optimum_peer.py runs it. What had to be worked around is in WORKAROUNDS, the
folder's `build.json` and the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vtprune.benchmarks.peer import make_venv, probe_venv
from vtprune.errors import UserError

PACKAGES = ["torch==2.13.0", "optimum-onnx[onnxruntime]"]  # torch pinned: the CPU wheel on local disk, not a CUDA build
EXPORT_TASK = "text-generation-with-past"
WORKAROUNDS = [
    "Optimum has no LLaVA export (no `llava` ONNX config, no image-text-to-text task for it: optimum issue #1751 open, "
    "PR #1790 closed unmerged), so only the text part is exported, as a LlamaForCausalLM checkpoint",
    "Optimum's decoder and ORTModelForCausalLM take input_ids only, never inputs_embeds: the exported graph's "
    "token-embedding Gather is cut out (onnx graph surgery at build time) so `inputs_embeds` is a graph input; the "
    "cut table is the embedding graph that splices the 576 image features in at the image tokens, and the past "
    "key/value loop ORTModelForCausalLM runs (empty past at prefill, presents fed back, position ids counted on) "
    "is run with onnxruntime directly (benchmarks/optimum_peer.py)",
    "optimum-onnx 0.1.0 pins transformers < 4.58, which reads rope_theta at the top level of config.json while the "
    "checkpoint (written by transformers 5) keeps it under rope_parameters: the exported config carries both",
    "ORTQuantizer runs on the cut graph (the graph that is timed), not on Optimum's original export",
]


def default_venv() -> Path:
    env = os.environ.get("VTPRUNE_OPTIMUM_VENV")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vtprune" / "optimum-venv"


def setup_venv(venv: Path | None = None, log=print) -> dict:
    """`vtprune bench --setup-peer`: Optimum's venv, apart from vtprune's (optimum-onnx pins transformers < 4.58)."""
    venv = venv or default_venv()
    make_venv(venv, PACKAGES, "optimum-onnx", log)
    python, version = find_optimum(venv)
    if python is None:
        raise UserError("--setup-peer", version)
    return {"venv": str(venv), "optimum_onnx": version}


def find_optimum(venv: Path | None = None) -> tuple[Path | None, str]:
    """(the venv's python, its optimum-onnx version) or (None, why not)."""
    venv = venv or default_venv()
    return probe_venv(venv, "import importlib.metadata as m, optimum.onnxruntime, onnxruntime; print(m.version('optimum-onnx'))",
                      f"no venv with optimum-onnx at {venv} (make it with `vtprune bench --setup-peer`, or set "
                      "VTPRUNE_OPTIMUM_VENV)", "optimum.onnxruntime")


# ---------------------------------------------------------------------------------- the graph surgery

def inputs_embeds_graph(proto, base_dir: Path | None = None):
    """In place: the decoder's token-embedding Gather (table initializer [V, D], indices the graph input `input_ids`)
    removed, `inputs_embeds` [batch_size, sequence_length, D] float a graph input in place of `input_ids`.
    Returns (proto, the table as numpy). The table's initializer is dropped unless something else reads it (tied
    lm_head). Refused when input_ids feeds anything but that one Gather."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers = [n for n in graph.node if "input_ids" in n.input]
    gathers = [n for n in readers if n.op_type == "Gather" and list(n.input)[1:] == ["input_ids"]
               and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if len(gathers) != 1 or len(readers) != 1:
        raise UserError("optimum export", "expected input_ids to feed one token-embedding Gather only, found "
                                          f"{[n.op_type + ' ' + n.name for n in readers]}")
    gather = gathers[0]
    table_name, embeds = gather.input[0], gather.output[0]
    table = numpy_helper.to_array(inits[table_name], base_dir=str(base_dir) if base_dir else "")
    graph.node.remove(gather)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == embeds:
                node.input[k] = "inputs_embeds"
    for out in graph.output:
        if out.name == embeds:
            raise UserError("optimum export", f"the embedding Gather's output {embeds} is a graph output")
    kept_info = [v for v in graph.value_info if v.name != embeds]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    if not any(table_name in n.input for n in graph.node):
        graph.initializer.remove(inits[table_name])
    ids = next(i for i in graph.input if i.name == "input_ids")
    dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
    new = helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [*dims, int(table.shape[1])])
    inputs = [new if i.name == "input_ids" else i for i in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    return proto, table


# ---------------------------------------------------------------------------------- the folder

QUANTIZE = """
import json, sys
from pathlib import Path
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
src, dst, external = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
quantizer = ORTQuantizer.from_pretrained(src, file_name="model.onnx")
config = AutoQuantizationConfig.avx512_vnni(is_static=False)
quantizer.quantize(quantization_config=config, save_dir=dst, use_external_data_format=external)
print(json.dumps({"file": [f.name for f in dst.glob("*.onnx")][0], "config": str(config)}))
"""


def ensure_peer(python: Path, model_dir: Path, bundle: Path, cache: Path, log) -> Path:
    """The peer's Optimum folder for this model (built once): vision.onnx, embedding.onnx, fp32/model.onnx and, where
    Optimum's quantizer succeeded, int8/<its file>; build.json says which, and why not."""
    import onnx

    from vtprune.benchmarks.bench_graphs import embedding_model, unpruned_vision
    from vtprune.benchmarks.peer import text_checkpoint

    target = cache / "optimum"
    if (target / "build.json").is_file():
        return target
    llama = text_checkpoint(model_dir, cache)
    tmp = Path(tempfile.mkdtemp(prefix=".optimum.partial-", dir=cache))
    try:
        view = tmp / "llama"  # the checkpoint seen with a transformers-4 config (WORKAROUNDS)
        view.mkdir()
        for f in llama.iterdir():
            if f.name != "config.json":
                os.symlink(f.resolve(), view / f.name)
        (view / "config.json").write_text(json.dumps(transformers4_config(json.loads((llama / "config.json").read_text())),
                                                     indent=1))
        export = tmp / "export"
        cmd = [str(python.parent / "optimum-cli"), "export", "onnx", "--model", str(view), "--task", EXPORT_TASK,
               str(export)]
        log(f"exporting the peer's decoder with Optimum ({' '.join(cmd[1:4])} --task {EXPORT_TASK}, {llama})")
        export_stats = _run_step(cmd, tmp / "export.log", "optimum-cli export onnx", llama)
        fp32 = tmp / "fp32"
        fp32.mkdir()
        proto = onnx.load(str(export / "model.onnx"), load_external_data=False)  # the weights stay where they are
        proto, table = inputs_embeds_graph(proto, export)
        onnx.save_model(proto, str(fp32 / "model.onnx"))
        data = [f for f in export.iterdir() if f.name not in ("model.onnx", "config.json", "generation_config.json")]
        for f in data:  # model.onnx_data of a > 2 GB model: its tensors' locations are relative to the graph
            os.replace(f, fp32 / f.name)
        shutil.copyfile(export / "config.json", fp32 / "config.json")
        del proto
        manifest = json.loads((bundle / "manifest.json").read_text())
        image_token_id = manifest["model"]["image_token_id"]
        onnx.save_model(embedding_model(table, image_token_id), str(tmp / "embedding.onnx"),
                        save_as_external_data=True, location="embedding.onnx.data")
        del table
        entry = manifest["graphs"]["vision"]["fp32"]
        vision = unpruned_vision(onnx.load(str(bundle / entry["file"])), manifest["model"]["num_patches"])
        onnx.save_model(vision, str(tmp / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data")
        del vision
        variants = {"fp32": "fp32/model.onnx"}
        quantize_cmd = [str(python), "-c", QUANTIZE, str(fp32), str(tmp / "int8"), "1" if data else "0"]
        log("quantizing it with Optimum's ORTQuantizer (AutoQuantizationConfig.avx512_vnni(is_static=False): dynamic int8)")
        try:
            quant_stats = _run_step(quantize_cmd, tmp / "quantize.log", "optimum ORTQuantizer", fp32)
            result = json.loads((tmp / "quantize.log").read_text().strip().splitlines()[-1])
            variants["int8"] = f"int8/{result['file']}"
            quant = {**quant_stats, "config": result["config"]}
        except (UserError, ValueError, KeyError, IndexError) as e:
            quant = {"error": f"{e.where}: {e.what}" if isinstance(e, UserError) else f"unreadable output: {e}"}
        shutil.rmtree(export, ignore_errors=True)
        shutil.rmtree(view, ignore_errors=True)
        eos = json.loads((fp32 / "config.json").read_text()).get("eos_token_id")
        build = {"export_command": cmd, "export": export_stats, "quantize": quant, "variants": variants,
                 "image_token_id": image_token_id, "eos_token_ids": [] if eos is None else np.atleast_1d(eos).tolist(),
                 "workarounds": WORKAROUNDS}
        (tmp / "build.json").write_text(json.dumps(build, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def transformers4_config(config: dict) -> dict:
    """A transformers-5 Llama config.json as transformers 4.x reads it: rope_theta (and a non-default rope_scaling)
    at the top level beside rope_parameters."""
    out = dict(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def _run_step(cmd: list[str], log_path: Path, what: str, source: Path) -> dict:
    """One build step in the Optimum venv under the memory limit (out of memory is a result, not a crash)."""
    from vtprune.benchmarks.limits import default_limit_mb, run_limited

    limit = default_limit_mb()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w+") as log_file:
        run = run_limited(cmd, limit, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        log_file.seek(0)
        last = ([x for x in log_file.read().splitlines() if x.strip()] or ["?"])[-1]
    if run.out_of_memory:
        raise UserError(what, f"out of memory on {source}: stopped at {run.peak_rss_mb / 1024:.1f} GB resident "
                              f"(limit {limit / 1024:.1f} GB), after {run.wall_s:.0f} s")
    if run.returncode != 0:
        raise UserError(what, f"failed on {source}: {last[:300]}")
    return {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}


def decoder_size_mb(folder: Path, variant_file: str) -> float:
    """The variant's graph and its external data (its folder, less the JSON beside them), in MB."""
    return sum(f.stat().st_size for f in (folder / variant_file).parent.iterdir() if f.suffix != ".json") / 2**20
