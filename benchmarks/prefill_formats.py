"""Which weight format should prefill on a CPU? The decoder variants at LLaVA-1.5-7B's widths (2 decoder layers,
where fp32 fits), each `vtprune run` in its own process, at a short prompt (Stage 1 on: k = 50) and a long one
(`--k-min 576`: all patches, 587 tokens), with decode beside it:

    python -m vtprune.benchmarks.prefill_formats --out benchmarks/results/<machine>-prefill-formats.json

Variants: fp32, int8 (dynamic), int4 (MatMulNBits block 32), int4-b128, and int4 decoding after an int8 prefill
(`--prefill-precision int8`: both variants' weights in memory). The checkpoint and bundle live in the user cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from vtprune.benchmarks.real_size import run_step

RUNS = {"fp32": ["--precision", "fp32"], "int8": ["--precision", "int8"], "int4": ["--precision", "int4"],
        "int4-b128": ["--precision", "int4-b128"], "int4 + int8 prefill": ["--precision", "int4", "--prefill-precision", "int8"]}
QUANTIZE = {"int8": ["--precision", "int8"], "int4": ["--precision", "int4"], "int4-b128": ["--precision", "int4", "--block-size", "128"]}


def main(argv=None) -> int:
    from vtprune.benchmarks.limits import default_limit_mb
    from vtprune.benchmarks.presets import cache_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant and prompt (medians)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default 0: all cores)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    root = cache_root() / "llava-1.5-7b-2l"
    model, bundle = root / "model", root / "bundle"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "prefill_formats.log"
    vt = [sys.executable, "-m", "vtprune.cli"]
    limit = default_limit_mb()
    record = {"runner": "python -m vtprune.benchmarks.prefill_formats " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg()},
              "model": "llava-1.5-7b widths, 2 decoder layers (benchmarks/presets.save_llava_7b)", "steps": {}, "runs": {}}
    if not (model / "config.json").is_file():
        code = f"from pathlib import Path; from vtprune.benchmarks.presets import build_llava_7b; build_llava_7b(Path({str(model)!r}), 2)"
        record["steps"]["checkpoint"] = run_step("checkpoint", [sys.executable, "-c", code], log, limit)
    if not (bundle / "manifest.json").is_file():
        record["steps"]["export"] = run_step("export", vt + ["export", "--model", str(model), "--out", str(bundle), "--json"], log, limit)
    have = json.loads((bundle / "manifest.json").read_text())["graphs"]["decoder"]
    for name, q in QUANTIZE.items():
        if name not in have:
            record["steps"][f"quantize {name}"] = run_step(f"quantize {name}", vt + ["quantize", "--bundle", str(bundle), *q,
                                                                                     "--graphs", "decoder", "--json"], log, limit)
    image = root / "sample.png"
    if not image.is_file():
        from vtprune.models.embedded.data import make_sample

        make_sample("test", seed=0, index=0).image.save(image)
    for k_min in (1, 576):
        for name, flags in RUNS.items():
            rows = []
            for r in range(args.repeats):
                step = run_step(f"run {name} k_min {k_min} #{r + 1}", vt + [
                    "run", "--bundle", str(bundle), *flags, "--image", str(image), "--prompt", "what is in the image ?",
                    "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--k-min", str(k_min),
                    "--json"], log, limit)
                out = step["output"] if isinstance(step["output"], dict) else {}
                rows.append({"exit_code": step["exit_code"], "peak_rss_mb": step["peak_rss_mb"],
                             **{key: out.get(key) for key in ("prompt_tokens", "prefill_ms", "decode_tokens_per_s", "precision")}})
            ok = [row for row in rows if row["exit_code"] == 0]
            record["runs"][f"k_min {k_min}: {name}"] = {
                "command": "vtprune run " + " ".join(flags) + f" --k-min {k_min} --threads {args.threads}",
                "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
                "prefill_ms_median": statistics.median(row["prefill_ms"] for row in ok) if ok else None,
                "decode_tokens_per_s_median": statistics.median(row["decode_tokens_per_s"] for row in ok) if ok else None,
                "peak_rss_mb": max((row["peak_rss_mb"] for row in ok), default=None), "runs": rows}
    record["bundle_bytes"] = {p.name: p.stat().st_size for p in bundle.iterdir() if p.name.startswith("decoder")}
    record["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=2))
    for name, r in record["runs"].items():
        print(f"{name:32s} {r['prompt_tokens']} tokens  prefill {r['prefill_ms_median']} ms  decode {r['decode_tokens_per_s_median']} tok/s  "
              f"{r['peak_rss_mb']} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
