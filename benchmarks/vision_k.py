"""Does a quantized vision graph keep the same visual tokens as fp32? Stage 1's split point is a knife edge
(the argmax of a curve of sorted CLS scores), so weight quantization before the score layer can move it.

    python -m vtprune.benchmarks.vision_k --bundle B --limit 200 --out benchmarks/results/<name>.json

For each vision variant in the bundle: the share of embedded test images whose k, and whose kept patches,
equal fp32's. It decides which precision an int4 bundle keeps its vision graph at (quant/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    from vtprune.models.embedded.data import make_sample
    from vtprune.models.preprocess import preprocess
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    bundle = Bundle.open(args.bundle)
    variants = list(bundle.manifest["graphs"]["vision"])
    pipes = {p: Pipeline(bundle, p, threads=1) for p in variants}
    ks = {p: [] for p in variants}
    same_k = {p: 0 for p in variants}
    same_kept = {p: 0 for p in variants}
    for i in range(args.limit):
        pixels = preprocess(make_sample("test", 0, i).image, pipes["fp32"].preprocess)
        ref = pipes["fp32"].encode_image(pixels)[1][0].tolist()
        for p, pipe in pipes.items():
            kept = pipe.encode_image(pixels)[1][0].tolist()
            ks[p].append(len(kept))
            same_k[p] += len(kept) == len(ref)
            same_kept[p] += kept == ref
    result = {"command": " ".join(["python -m vtprune.benchmarks.vision_k", *(argv or sys.argv[1:])]),
              "load_average": os.getloadavg(), "images": args.limit, "split": "test", "seed": 0,
              "variants": {p: {"same_k": same_k[p] / args.limit, "same_kept_patches": same_kept[p] / args.limit,
                               "mean_k": sum(ks[p]) / args.limit} for p in variants}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["variants"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
