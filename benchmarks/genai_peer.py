"""The peer's timings, run by the Python of ONNX Runtime GenAI's own venv (no vtprune import: that venv has
numpy, onnxruntime and onnxruntime_genai): `python genai_peer.py SPEC.json OUT.json`.

The peer is the strongest ONNX path a user can assemble without vtprune: GenAI's vision pipeline (the
`phi3v` pipeline type: vision model -> embedding model -> decoder) over the unpruned vision graph, an
embedding graph that splices the image features in, and the text decoder from GenAI's model builder
(INT4, exclude_embeds). GenAI runs vision, embedding and prefill inside `set_inputs`, so the vision
time is taken from the same vision graph run alone in onnxruntime, after the GenAI runs (so it adds
nothing to the peak RSS reported).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _model_dir(peer: Path, threads: int, tmp: str) -> Path:
    """The peer folder seen through a copy of its genai_config.json with this run's thread count."""
    config = json.loads((peer / "genai_config.json").read_text())
    for part in ("decoder", "vision", "embedding"):
        options = config["model"][part].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        options["inter_op_num_threads"] = 1
    view = Path(tmp)
    for f in peer.iterdir():
        if f.name != "genai_config.json":
            os.symlink(f, view / f.name)
    (view / "genai_config.json").write_text(json.dumps(config))
    return view


def main(argv: list[str]) -> int:
    import onnxruntime_genai as og

    spec = json.loads(Path(argv[0]).read_text())
    data = np.load(spec["samples"], allow_pickle=False)
    samples = [(data[f"expanded_ids_{i}"].astype(np.int32), data[f"pixel_values_{i}"]) for i in range(int(data["count"]))]
    n_image = int(spec["num_image_tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        model = og.Model(str(_model_dir(Path(spec["model"]), spec["threads"], tmp)))

        def one(ids: np.ndarray, pixels: np.ndarray, new_tokens: int) -> dict:
            params = og.GeneratorParams(model)
            total = len(ids) + new_tokens
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            generator = og.Generator(model, params)
            inputs = og.NamedTensors()
            inputs["input_ids"] = ids[None]  # GenAI reads input_ids as int32
            inputs["pixel_values"] = pixels
            inputs["num_image_tokens"] = np.array([n_image], dtype=np.int64)
            times = []
            t0 = time.perf_counter()
            generator.set_inputs(inputs)  # vision + embedding + prefill
            while not generator.is_done():
                generator.generate_next_token()
                times.append(time.perf_counter())
            return {"ttft_ms": (times[0] - t0) * 1e3, "token_ms": [(t - times[0]) * 1e3 for t in times],
                    "visual_tokens": n_image, "prompt_tokens": int(len(ids))}

        one(*samples[0], spec["warmup_tokens"])
        runs = [one(ids, px, spec["new_tokens"]) for _ in range(spec["repeats"]) for ids, px in samples]
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        del model

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    vision = ort.InferenceSession(str(Path(spec["model"]) / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    vision.run(None, {"pixel_values": samples[0][1]})  # warm-up
    for k, run in enumerate(runs):
        t0 = time.perf_counter()
        vision.run(None, {"pixel_values": samples[k % len(samples)][1]})
        run["vision_ms"] = (time.perf_counter() - t0) * 1e3
        run["prefill_ms"] = run["ttft_ms"] - run["vision_ms"]
    out = {"runs": runs, "peak_rss_mb": peak_rss_mb, "versions": {"onnxruntime_genai": og.__version__,
                                                                 "onnxruntime": ort.__version__}}
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
