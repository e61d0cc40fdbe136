"""Hardware presets for the roofline and the memory plan: peak ops/s, memory bandwidth, memory size.

Peaks are dense (no 2:4 sparsity), as LLM-Viewer takes them ("the OPS = sparse OPS/2"). The `cpu`
preset is this machine, measured once with ONNX Runtime's own kernels, the ones the runtime's graphs run
(fp32 MatMul, dynamic int8 MatMulInteger, int4 MatMulNBits at the quantizer's default block / accuracy level 4), at a prefill M
and at M = 1 over more weight bytes than the last-level cache, beside a memory copy; cached in
~/.cache/vtprune/cpu.json. So no point the runtime measures sits above its roof (a numpy GEMM, the
fallback without the `export` extra's onnx, is below ORT's int8 and int4 kernels).
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


def kernel_format(weight_bits: float) -> str:
    """The CPU kernel a weight width runs on: int4 (4 bits plus block scales), int8, or fp32."""
    return "int4" if weight_bits < 8 else "int8" if weight_bits == 8 else "fp32"


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s of the main memory
    fp16_ops: float  # ops/s of 16-bit (CPU: 32-bit float) matmuls
    int8_ops: float  # ops/s of 8-bit integer matmuls; LLM-Viewer runs INT4 at this peak too
    memory_bytes: int
    act_bits: int = 16  # activations/KV as deployed: fp16 on GPUs, fp32 on the CPU runtime
    kind: str = "gpu"  # "gpu" or "cpu": picks the runtime overhead in the memory model
    int4_ops: float | None = None  # CPU: ops/s of the int4 kernel (MatMulNBits); GPUs follow LLM-Viewer's rule
    measured: dict | None = None  # CPU: each kernel's rates, how they were measured

    def peak_ops(self, weight_bits: int, act_bits: int, kv_bits: int) -> float:
        """GPUs, LLM-Viewer's rule: the INT8 peak only when weights, activations and KV are all <= 8 bits;
        weight-only quantization (W8A16, W4A16) computes in 16 bits. The CPU: the peak of the kernel the
        weight format runs (dynamic int8 and MatMulNBits quantize the activations inside the kernel)."""
        if self.kind == "cpu" and self.int4_ops is not None:
            return {"int4": self.int4_ops, "int8": self.int8_ops, "fp32": self.fp16_ops}[kernel_format(weight_bits)]
        return self.int8_ops if max(weight_bits, act_bits, kv_bits) <= 8 else self.fp16_ops

    def memory_rate(self, weight_bits: float) -> float:
        """Bytes/s of the roof's slope. GPUs: the memory's bandwidth. The measured CPU: the rate at which the
        weight format's kernel streams its weights at M = 1 (a decode step), as the compute roof is the
        kernel's peak: one core's kernels stream slower than the memory copies (int8 MatMulInteger at 0.65 of
        a copy here), so a roof at the copy rate would put each kernel's own limit into the ratio."""
        rates = (self.measured or {}).get("kernels", {})
        fmt = kernel_format(weight_bits)
        return rates[fmt]["weight_bytes_per_s_m1"] if fmt in rates else self.bandwidth

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


def cpu(cache_path: Path | None = None, **sizes) -> Hardware:
    """This machine's CPU: cached figures if they were measured on this host, else measure and cache."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    host = _host_id()
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("host") == host and cached.get("method") == METHOD:
                return Hardware(**cached["hardware"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a stale or broken cache is measured again
    hw = measure_cpu(**sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"host": host, "method": METHOD, "hardware": hw.to_dict()}, indent=1))
    tmp.replace(path)
    return hw


METHOD = 5  # 1: numpy GEMM + copy; 2: ONNX Runtime's kernels per weight format; 3: int8 weights in 7 bits; 4: int4 at block 128;
# 5: distinct bytes in every layer, M fixed (older caches are re-measured)


def measure_cpu(k: int = 4096, prefill_m: int = 256, stream_mb: int = 1024, copy_mb: int = 256, repeats: int = 3,
                threads: int = 0) -> Hardware:
    """Each weight format's kernel in ONNX Runtime (all its threads), best of `repeats`:
    - ops/s at M = `prefill_m` on a chain of 4 [k, k] weights (the prefill roof);
    - weight bytes/s at M = 1 on a chain holding `stream_mb` of weights in that format (decode reads every
      weight once per token; more than the last-level cache, so it is memory's rate, not the cache's);
    and a memory copy (reads and writes every byte: 2 * size / time). The bandwidth roof is the fastest of
    these. Without onnx (the `export` extra) the fallback is a numpy GEMM (all three peaks) and the copy."""
    import numpy as np

    src = np.ones(copy_mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copy = 2.0 * src.nbytes / min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    del src, dst
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        from vtprune.benchmarks.kernels import chain_rates
    except ImportError:  # the core install: no onnx to build the kernels' graphs with
        flops = _numpy_gemm(min(k, 1024), repeats)
        return Hardware("cpu", bandwidth=copy, fp16_ops=flops, int8_ops=flops, memory_bytes=int(memory), act_bits=32,
                        kind="cpu", measured={"method": "numpy GEMM (no onnx installed) and a memory copy", "copy_bytes_per_s": copy})
    rates = {fmt: chain_rates(fmt, k, prefill_m, stream_mb, repeats, threads) for fmt in ("fp32", "int8", "int4")}
    bandwidth = max([copy] + [r["weight_bytes_per_s_m1"] for r in rates.values()])
    return Hardware("cpu", bandwidth=bandwidth, fp16_ops=rates["fp32"]["ops_per_s"], int8_ops=rates["int8"]["ops_per_s"],
                    int4_ops=rates["int4"]["ops_per_s"], memory_bytes=int(memory), act_bits=32, kind="cpu",
                    measured={"method": f"ONNX Runtime kernels: chains of [{k}, {k}] weights, M = {prefill_m} and M = 1, "
                                        f"{threads or 'all'} threads",
                              "copy_bytes_per_s": copy, "kernels": rates})


def _numpy_gemm(n: int, repeats: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    return 2.0 * n**3 / min(_timed(lambda: a @ b) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _host_id() -> str:
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}"
