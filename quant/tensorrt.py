"""TensorRT variants (trt-fp16, trt-int8) through ONNX Runtime's TensorRT execution provider.

Why the provider rather than `trtexec`: it inlines the ai.vtprune model-local functions before partitioning,
hands TensorRT what its parser accepts and leaves the rest to CUDA/CPU, and caches the engines it builds.
A TensorRT engine is specific to one GPU and TensorRT version, so "building" a variant here means: register
the ONNX graph it is built from with the provider options, then open it once so the engine cache is filled.
  trt-fp16  the fp32 graph, `trt_fp16_enable`;
  trt-int8  the int8-static QDQ graph (explicit quantization, TensorRT reads the Q/DQ scales), quantized first
            if the bundle has none.
The runtime passes the entry's `provider_options` to its session (`Bundle.provider_options`).
Anywhere without TensorRT and an NVIDIA GPU this is a one-line UserError.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np

from vtprune.errors import UserError
from vtprune.runtime.bundle import Bundle

CACHE_DIR = "trt-cache"
PROVIDER = "TensorrtExecutionProvider"


def nvidia_gpu_present() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout.strip().startswith("GPU")
    except (OSError, subprocess.SubprocessError):
        return False


def check_tensorrt(precision: str) -> None:
    """Raise the one-line error unless TensorRT, ORT's TensorRT provider and an NVIDIA GPU are all here."""
    import onnxruntime as ort

    have_trt = importlib.util.find_spec("tensorrt") is not None
    have_ep = PROVIDER in ort.get_available_providers()
    if not (have_trt and nvidia_gpu_present()):
        raise UserError("--precision", f"{precision} needs an NVIDIA GPU with TensorRT (pip install vtprune[tensorrt]); none here")
    if not have_ep:
        raise UserError("--precision", f"{precision} needs onnxruntime-gpu with the TensorRT provider (pip install vtprune[gpu]); "
                        f"this onnxruntime has {', '.join(ort.get_available_providers())}")


def provider_options(graph: str, precision: str) -> dict:
    """TensorRT provider options, with paths relative to the bundle (the runtime joins them to its root)."""
    return {
        "trt_fp16_enable": True,  # also for trt-int8: layers TensorRT keeps unquantized run in fp16
        "trt_int8_enable": precision == "trt-int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": f"{CACHE_DIR}/{graph}.{precision}",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": CACHE_DIR,
    }


def _warmup_feed(bundle: Bundle, graph: str) -> dict:
    """One real input, so the first engine is built for real shapes (the bundle's sample, else a test scene)."""
    from vtprune.models.embedded.data import make_sample
    from vtprune.runtime.generate import Pipeline
    from vtprune.runtime.slots import SlotCache
    from vtprune.models.preprocess import preprocess

    pipe = Pipeline(bundle, "fp32", "cpu", threads=1)
    sample = make_sample("test", seed=0, index=0)
    pixels = preprocess(sample.image, pipe.preprocess)
    if graph == "vision":
        return {"pixel_values": pixels, "k_min": np.array(pipe.prune.k_min, np.int64)}
    prompt = pipe.tokenizer.build(sample.question, pipe.template)
    embeds = pipe.splice(prompt, pipe.encode_image(pixels)[0])  # [1, L, D]
    L = embeds.shape[1]
    heavy, recent = pipe.budget(L, pipe.prune)
    cache = pipe.empty_cache(capacity=pipe.cache_capacity((heavy, recent), L))
    return {"inputs_embeds": embeds, "position_ids": np.arange(L, dtype=np.int64)[None],
            "heavy_budget": np.array(heavy, np.int64), "recent_budget": np.array(recent, np.int64),
            **(cache.arrays() if isinstance(cache, SlotCache) else cache)}


def build_trt_variant(bundle: Bundle, graph: str, precision: str) -> dict:
    import onnxruntime as ort

    from vtprune.export.bundle import write_manifest

    check_tensorrt(precision)
    source = "int8-static" if precision == "trt-int8" else "fp32"
    if source not in bundle.manifest["graphs"][graph]:
        from vtprune.quant.quantize import calibration_feeds, quantize_graph

        quantize_graph(bundle, graph, "int8-static", 32, calibration_feeds(bundle, [graph], 32)[graph])
    base = bundle.manifest["graphs"][graph][source]
    path = bundle.graph(graph, source)
    options = provider_options(graph, precision)
    (bundle.root / options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    absolute = {**options, "trt_engine_cache_path": str(bundle.root / options["trt_engine_cache_path"]),
                "trt_timing_cache_path": str(bundle.root / options["trt_timing_cache_path"])}
    session = ort.InferenceSession(str(path), providers=[(PROVIDER, absolute), "CUDAExecutionProvider", "CPUExecutionProvider"])
    session.run(None, _warmup_feed(bundle, graph))  # builds and caches the engine(s)
    entry = {**base, "precision": precision, "providers": [PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider"],
             "provider_options": {PROVIDER: options}, "built_from": source}
    bundle.manifest["graphs"][graph][precision] = entry
    write_manifest(bundle.root, bundle.manifest)
    return entry
