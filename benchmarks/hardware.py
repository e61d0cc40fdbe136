"""Hardware presets for the roofline and the memory plan: peak ops/s, memory bandwidth, memory size.

Peaks are dense (no 2:4 sparsity), as LLM-Viewer takes them ("the OPS = sparse OPS/2"). The `cpu`
preset is this machine, measured once by a short numpy GEMM and a memory-copy micro-benchmark and
cached in ~/.cache/vtprune/cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vtprune.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s of the main memory
    fp16_ops: float  # ops/s of 16-bit (CPU: 32-bit float) matmuls
    int8_ops: float  # ops/s of 8-bit integer matmuls; LLM-Viewer runs INT4 at this peak too
    memory_bytes: int
    act_bits: int = 16  # activations/KV as deployed: fp16 on GPUs, fp32 on the CPU runtime
    kind: str = "gpu"  # "gpu" or "cpu": picks the runtime overhead in the memory model

    def peak_ops(self, weight_bits: int, act_bits: int, kv_bits: int) -> float:
        """LLM-Viewer's rule: the INT8 peak only when weights, activations and KV are all <= 8 bits;
        weight-only quantization (W8A16, W4A16) computes in 16 bits."""
        return self.int8_ops if max(weight_bits, act_bits, kv_bits) <= 8 else self.fp16_ops

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (ops/byte) where the 16-bit roof turns from memory- to compute-bound."""
        return self.fp16_ops / self.bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Hardware] = {
    # NVIDIA A100 40GB (SXM) datasheet: 1,555 GB/s HBM2, 312 TFLOPS FP16 tensor, 624 TOPS INT8 tensor (dense);
    # identical to LLM-Viewer's `nvidia_A100_40G` preset, which the paper's Table 6 used.
    "a100-40g": Hardware("a100-40g", bandwidth=1555e9, fp16_ops=312e12, int8_ops=624e12, memory_bytes=40 * GIB),
    # NVIDIA A100 80GB (SXM) datasheet: 2,039 GB/s HBM2e; same tensor peaks (LLM-Viewer `nvidia_A100_80G`).
    "a100-80g": Hardware("a100-80g", bandwidth=2039e9, fp16_ops=312e12, int8_ops=624e12, memory_bytes=80 * GIB),
    # NVIDIA Ada Lovelace architecture whitepaper v1.1, GeForce RTX 4090: 1,008 GB/s GDDR6X, 24 GB;
    # FP16 tensor with FP32 accumulate 165.2 TFLOPS (what cuBLAS/PyTorch fp16 GEMMs use on GeForce),
    # INT8 tensor 660.6 TOPS (dense).
    "rtx4090": Hardware("rtx4090", bandwidth=1008e9, fp16_ops=165.2e12, int8_ops=660.6e12, memory_bytes=24 * GIB),
    # NVIDIA H100 SXM5 80GB datasheet: 3.35 TB/s HBM3, 1,979 TFLOPS FP16 / 3,958 TOPS INT8 *with sparsity*,
    # so 989.4 TFLOPS / 1,979 TOPS dense.
    "h100": Hardware("h100", bandwidth=3.35e12, fp16_ops=989.4e12, int8_ops=1979e12, memory_bytes=80 * GIB),
}


def get(name: str, option: str = "--hardware") -> Hardware:
    """A preset by name; `cpu` is measured on first use and cached."""
    key = name.lower()
    if key == "cpu":
        return cpu()
    if key not in PRESETS:
        raise UserError(option, f"unknown hardware {name!r}; expected one of {', '.join([*PRESETS, 'cpu'])}")
    return PRESETS[key]


def default_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vtprune" / "cpu.json"


def cpu(cache_path: Path | None = None, gemm_n: int = 1024, copy_mb: int = 256, repeats: int = 5) -> Hardware:
    """This machine's CPU: cached figures if they were measured on this host, else measure and cache."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    host = _host_id()
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("host") == host:
                return Hardware(**cached["hardware"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a stale or broken cache is measured again
    hw = measure_cpu(gemm_n=gemm_n, copy_mb=copy_mb, repeats=repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"host": host, "hardware": hw.to_dict()}, indent=1))
    tmp.replace(path)
    return hw


def measure_cpu(gemm_n: int = 1024, copy_mb: int = 256, repeats: int = 5) -> Hardware:
    """Best-of-`repeats` float32 GEMM rate (numpy's BLAS, all its threads) and memory-copy bandwidth.

    A copy reads and writes every byte, so bandwidth = 2 * size / time. numpy has no int8 BLAS, so the
    INT8 peak is set to the float32 one (the runtime's int8 kernels may beat it; the roofline will not
    claim they do)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    flops = 2.0 * gemm_n**3 / best

    src = np.ones(copy_mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    bandwidth = 2.0 * src.nbytes / best

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", bandwidth=bandwidth, fp16_ops=flops, int8_ops=flops, memory_bytes=int(memory),
                    act_bits=32, kind="cpu")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _host_id() -> str:
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}"
