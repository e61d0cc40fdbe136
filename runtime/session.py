"""ONNX Runtime sessions with a chosen execution provider, and a clear message when it is missing."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from vtprune.errors import UserError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def best_provider() -> str:
    available = ort.get_available_providers()
    return next(name for name, ep in PROVIDERS.items() if ep in available and name != "tensorrt") if available else "cpu"


def providers_for(name: str | None) -> list[str]:
    """The provider list for a session, best first; CPU is always the fallback for unsupported nodes."""
    name = name or best_provider()
    ep = PROVIDERS.get(name)
    if ep is None:
        raise UserError("--provider", f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if ep not in available:
        need = "onnxruntime-gpu and an NVIDIA GPU" if name == "cuda" else "TensorRT, onnxruntime-gpu and an NVIDIA GPU"
        raise UserError("--provider", f"{name} is not available here (it needs {need}); available: {', '.join(available)}")
    chain = [ep] + ([PROVIDERS["cuda"]] if name == "tensorrt" else [])
    return chain + ([PROVIDERS["cpu"]] if ep != PROVIDERS["cpu"] else [])


def open_session(path: Path, provider: str | None, threads: int = 0, options_by_provider: dict | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings shown: the graphs are expected to give none (a test checks)
    if threads:
        options.intra_op_num_threads = threads
    try:
        providers = providers_for(provider)
        extra = options_by_provider or {}
        return ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                    provider_options=[extra.get(ep, {}) for ep in providers])
    except UserError:
        raise
    except Exception as e:  # ORT raises its own exception types for invalid or truncated graphs
        raise UserError(str(path), f"ONNX Runtime cannot load this graph: {str(e).splitlines()[0][:300]}") from None
