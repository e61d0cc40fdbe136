"""LLaVA-1.5-7B end to end on this machine: the preset checkpoint, `export --fp16`, `quantize --precision
int4`, `run`, each as the user would type it, in its own process, with its wall time and its own peak RSS.

    python -m vtprune.benchmarks.real_size --out benchmarks/results/<machine>-llava-1.5-7b-real-size.json

The checkpoint (random weights at llava-hf/llava-1.5-7b-hf's shapes, 14 GB) and the bundle (~60 GB with the
fp32, fp16 and int4 decoders) live in the user cache (`benchmarks/presets.py`), never in the repository.
Each step's figure is the child's own `ru_maxrss` (os.wait4), so one step's memory never carries another's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from vtprune.benchmarks.limits import run_limited

GB = 1e9


def run_step(name: str, argv: list[str], log: Path, limit_mb: float) -> dict:
    """One command in a fresh process under the memory limit: wall time, exit code, its own peak RSS, its JSON."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    out = log.with_suffix(f".{name.replace(' ', '_')}.json")
    with open(log, "ab") as err, open(out, "wb") as stdout:
        r = run_limited(argv, limit_mb, stdout=stdout, stderr=err)
    result = {"command": " ".join(argv), "exit_code": r.returncode, "wall_s": round(r.wall_s, 1),
              "peak_rss_mb": round(r.peak_rss_mb), "out_of_memory": r.out_of_memory}
    try:
        result["output"] = json.loads(out.read_text() or "null")
    except json.JSONDecodeError:
        result["output"] = out.read_text()[-2000:]
    print(f"    exit {r.returncode}, {r.wall_s:.0f} s, peak RSS {result['peak_rss_mb']} MB", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    from vtprune.benchmarks.limits import default_limit_mb
    from vtprune.benchmarks.presets import cache_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--layers", type=int, default=None, help="text layers (default: the real 32)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    key = "llava-1.5-7b" + (f"-{args.layers}l" if args.layers else "")
    root = cache_root() / key
    model, bundle = root / "model", root / "bundle"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "real_size.log"
    vt = [sys.executable, "-m", "vtprune.cli"]
    limit = default_limit_mb()
    steps = {}
    free = shutil.disk_usage(root).free
    record = {"memory_limit_mb": round(limit), "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg_start": os.getloadavg(), "disk_free_gb_start": round(free / GB, 1)},
              "model": key, "cache": str(root), "steps": steps}
    if not (model / "config.json").is_file():
        code = ("from pathlib import Path; from vtprune.benchmarks.presets import build_llava_7b; "
                f"build_llava_7b(Path({str(model)!r}), {args.layers!r})")
        steps["checkpoint"] = run_step("checkpoint", [sys.executable, "-c", code], log, limit)
    if not (bundle / "manifest.json").is_file():
        steps["export_fp16"] = run_step("export", vt + ["export", "--model", str(model), "--out", str(bundle), "--fp16", "--json"], log, limit)
    steps["quantize_int4"] = run_step("quantize", vt + ["quantize", "--bundle", str(bundle), "--precision", "int4",
                                                        "--graphs", "decoder", "--json"], log, limit)
    image = root / "sample.png"
    if not image.is_file():
        from vtprune.models.embedded.data import make_sample

        make_sample("test", seed=0, index=0).image.save(image)
    # fp32 only for shallow variants: the 32-layer fp32 decoder is 26 GB, more than this machine's memory.
    for precision in ("int4",) if args.layers is None else ("int4", "fp32"):
        steps[f"run_{precision}"] = run_step(f"run {precision}", vt + [
            "run", "--bundle", str(bundle), "--precision", precision, "--image", str(image), "--prompt",
            "what is in the image ?", "--max-new-tokens", str(args.max_new_tokens), "--json"], log, limit)
    sizes = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    record["bundle_bytes"] = sizes
    record["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
