"""The peer (b): ONNX Runtime GenAI, found in its own venv, and its model folder built from the same weights.

onnxruntime-genai is never a vtprune dependency. The bench looks for a venv at $VTPRUNE_GENAI_VENV or
~/.cache/vtprune/genai-venv whose Python imports `onnxruntime_genai` (`vtprune bench --setup-peer` makes it);
without it the peer is reported `unavailable`, with why.

The folder: GenAI's model builder (`-p int4 -e cpu --extra_options exclude_embeds=true`) on the LLaVA's
text part saved as a LlamaForCausalLM checkpoint, plus the unpruned vision graph and an embedding graph
(benchmarks/bench_graphs.py), wired as GenAI's `phi3v` vision pipeline in genai_config.json. What had to
be worked around is recorded in the folder's `build.json` and in the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from vtprune.errors import UserError

PIPELINE_TYPE = "phi3v"  # a GenAI pipeline type of the form vision -> embedding -> decoder
WORKAROUNDS = [
    "onnxruntime-genai 0.18's builder imports onnx_ir, which its wheel does not require: onnx-ir installed in the venv",
    "the builder loads a tokenizer from the input folder: the LLaVA's tokenizer.json copied beside the Llama weights",
    "GenAI has no LLaVA-1.5 pipeline and a plain decoder cannot take user inputs_embeds (GenAI issues #1163, #1644): "
    "the builder's decoder is wired into GenAI's `phi3v` vision pipeline with the unpruned vision graph and an "
    "embedding graph that splices the 576 image features in at the image tokens",
    "GenAI reads NamedTensors input_ids as int32 (int64 ids are misread)",
    "the phi3v pipeline is driven with our own pixel_values (the same CLIP-preprocessed tensors every system gets), "
    "not GenAI's phi3v image processor",
]


def default_venv() -> Path:
    env = os.environ.get("VTPRUNE_GENAI_VENV")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vtprune" / "genai-venv"


PEER_PACKAGES = ["torch==2.13.0", "onnxruntime-genai", "onnx-ir", "transformers", "onnx"]


def make_venv(venv: Path, packages: list[str], what: str, log=print) -> None:
    """A peer's own venv (created if missing) with `packages` pip-installed; one line naming `what` if pip fails."""
    import sys

    if not (venv / "bin" / "python").is_file():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(packages)} into {venv}")
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = ([x for x in proc.stderr.splitlines() if x.strip()] or ["?"])[-1]
        raise UserError("--setup-peer", f"pip could not install {what} into {venv}: {last[:300]}")


def probe_venv(venv: Path, code: str, missing: str, cannot: str) -> tuple[Path | None, str]:
    """(the venv's python, the last line `code` prints there: a version) or (None, why not)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        return None, missing
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{python} cannot import {cannot}: {last[:200]}"
    return python, proc.stdout.strip().splitlines()[-1]


def setup_venv(venv: Path | None = None, log=print) -> dict:
    """`vtprune bench --setup-peer`: the peer's venv, apart from vtprune's (GenAI pins its own transformers)."""
    venv = venv or default_venv()
    make_venv(venv, PEER_PACKAGES, "the peer", log)
    python, version = find_genai(venv)
    if python is None:
        raise UserError("--setup-peer", version)
    return {"venv": str(venv), "onnxruntime_genai": version}


def find_genai(venv: Path | None = None) -> tuple[Path | None, str]:
    """(the venv's python, its onnxruntime-genai version) or (None, why not)."""
    venv = venv or default_venv()
    return probe_venv(venv, "import onnxruntime_genai as og, onnx_ir; print(og.__version__)",
                      f"no venv with onnxruntime-genai at {venv} (make it with `vtprune bench --setup-peer`, or set VTPRUNE_GENAI_VENV)",
                      "onnxruntime_genai and onnx_ir")


def text_checkpoint(model_dir: Path, cache: Path) -> Path:
    """<cache>/llama: the LLaVA's text part as a LlamaForCausalLM checkpoint (built once), what both peers export."""
    from vtprune.benchmarks import presets

    llama = cache / "llama"
    presets._build_once(llama, lambda tmp: presets.save_text_model(model_dir, tmp))
    return llama


def ensure_peer(python: Path, model_dir: Path, bundle: Path, cache: Path, log) -> Path:
    """The peer's GenAI folder for this model (built once), made from the bundle's fp32 vision graph."""
    import onnx

    from vtprune.benchmarks.bench_graphs import embedding_model, unpruned_vision

    target = cache / "genai"
    if (target / "build.json").is_file():
        return target
    llama = text_checkpoint(model_dir, cache)
    tmp = Path(tempfile.mkdtemp(prefix=".genai.partial-", dir=cache))
    try:
        cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(tmp),
               "-p", "int4", "-e", "cpu", "-c", str(tmp / ".hf-cache"), "--extra_options", "exclude_embeds=true"]
        log(f"building the peer's INT4 decoder with ONNX Runtime GenAI's model builder ({llama})")
        from vtprune.benchmarks.limits import default_limit_mb, run_limited

        limit = default_limit_mb()
        with open(tmp / "builder.log", "w+") as log_file:  # under the limit: a builder out of memory is a result
            run = run_limited(cmd, limit, stdout=log_file, stderr=subprocess.STDOUT)
            log_file.seek(0)
            last = ([x for x in log_file.read().splitlines() if x.strip()] or ["?"])[-1]
        if run.out_of_memory:
            raise UserError("onnxruntime-genai model builder", f"out of memory on {llama}: stopped at {run.peak_rss_mb / 1024:.1f} "
                                                               f"GB resident (limit {limit / 1024:.1f} GB), after {run.wall_s:.0f} s")
        if run.returncode != 0:
            raise UserError("onnxruntime-genai model builder", f"failed on {llama}: {last[:300]}")
        build_stats = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}
        shutil.rmtree(tmp / ".hf-cache", ignore_errors=True)
        manifest = json.loads((bundle / "manifest.json").read_text())
        entry = manifest["graphs"]["vision"]["fp32"]
        vision = unpruned_vision(onnx.load(str(bundle / entry["file"])), manifest["model"]["num_patches"])
        onnx.save_model(vision, str(tmp / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data")
        del vision
        table = np.load(bundle / manifest["embed_tokens"]["file"], allow_pickle=False)
        onnx.save_model(embedding_model(table, manifest["model"]["image_token_id"]), str(tmp / "embedding.onnx"),
                        save_as_external_data=True, location="embedding.onnx.data")
        config = json.loads((tmp / "genai_config.json").read_text())
        config["model"]["type"] = PIPELINE_TYPE
        config["model"]["image_token_id"] = manifest["model"]["image_token_id"]
        config["model"]["vision"] = {"filename": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
                                     "outputs": {"image_features": "image_features"}}
        config["model"]["embedding"] = {"filename": "embedding.onnx",
                                        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                                        "outputs": {"inputs_embeds": "inputs_embeds"}}
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "build.json").write_text(json.dumps({"builder_command": cmd, "workarounds": WORKAROUNDS, **build_stats}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
