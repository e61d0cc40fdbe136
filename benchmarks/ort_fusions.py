"""What ONNX Runtime's fusions (onnxscript's rewriter, `ort_fusions.optimize_for_ort`) make of a bundle's decoder,
and what they buy per decode step on this CPU, against the portable graph:

    python -m vtprune.benchmarks.ort_fusions --bundle B [--precision fp32] --out F.json

The fused graph is ORT-only (com.microsoft ops, the ai.vtprune functions inlined); its logits are compared with the
portable graph's on the same cache. Both run one thread, alternately, best of --repeats blocks of --steps steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _feed(model: dict, past: int, seed: int = 0) -> dict:
    """One decode step on a full cache of `past` positions (budgets cover it: nothing is evicted)."""
    rng = np.random.default_rng(seed)
    H, Dh = model["num_kv_heads"], model["head_dim"]
    feed = {"inputs_embeds": rng.standard_normal((1, 1, model["hidden_size"]), dtype=np.float32) * np.float32(0.02),
            "position_ids": np.array([[past]]), "heavy_budget": np.array(past + 1), "recent_budget": np.array(0)}
    for i in range(model["num_layers"]):
        feed[f"past.{i}.key"] = rng.standard_normal((1, H, past, Dh), dtype=np.float32)
        feed[f"past.{i}.value"] = rng.standard_normal((1, H, past, Dh), dtype=np.float32)
        feed[f"past.{i}.score"] = rng.random((1, H, past), dtype=np.float32)
    return feed


def main(argv=None) -> int:
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxscript.rewriter import ort_fusions

    from vtprune.runtime.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--past", type=int, default=120, help="cached positions at the timed step (default 120)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    bundle = Bundle.open(args.bundle)
    source = bundle.graph("decoder", args.precision)
    model = ir.load(str(source))
    before = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph)
    fused, stats = ort_fusions.optimize_for_ort(model)
    after = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in fused.graph)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decoder.fused.onnx"
        ir.save(fused, str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        sessions = {"portable": ort.InferenceSession(str(source), options), "ort_fused": ort.InferenceSession(str(path), options)}
        feed = _feed(bundle.manifest["model"], args.past)
        logits = {name: s.run(["logits"], feed)[0] for name, s in sessions.items()}
        best = {name: float("inf") for name in sessions}
        for _ in range(args.repeats):
            for name, s in sessions.items():  # alternately, so both see the same machine
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    s.run(["logits"], feed)
                best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    record = {
        "command": " ".join(["python -m vtprune.benchmarks.ort_fusions", *(argv if argv is not None else sys.argv[1:])]),
        "bundle": str(bundle.root), "precision": args.precision, "past": args.past,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "fusions_applied": {k: v for k, v in stats.items() if v},
        "nodes": {"portable": sum(before.values()), "ort_fused": sum(after.values())},
        "contrib_ops": {k: v for k, v in after.items() if not k.startswith("ai.onnx::")},
        "ms_per_step": {k: round(v * 1e3, 4) for k, v in best.items()},
        "speedup": round(best["portable"] / best["ort_fused"], 3),
        "max_abs_logit_diff": float(np.abs(logits["portable"] - logits["ort_fused"]).max()),
    }
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
