"""One system's timings, in a process of its own (so peak RSS is that system's): `python -m
vtprune.benchmarks.measure SPEC.json OUT.json`.

Systems: `transformers` (LlavaForConditionalGeneration.generate, eager, fp32, all 576 visual tokens) and
`vtprune` (the torch-free runtime on a bundle variant). Both answer the same prompts about the same
preprocessed images (the spec's samples.npz), greedy, never stopping at EOS, after one warm-up run.

Each run records vision ms, prefill ms, time to first token and the time at which every new token
was produced, from which `summary.py` derives decode tokens/s at any length up to the run's.

Progress (loading, the warm-up, each sample of each repeat as it completes) goes to stderr as lines starting with
PROGRESS, which `bench.run_worker` passes on to the user's stderr; the result is OUT.json, never stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtprune.runtime.bundle import Bundle

PROGRESS = "vtprune-bench-progress: "  # the prefix of the lines bench.run_worker passes on


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


def load_samples(path: str | Path) -> list[dict]:
    """samples.npz: pixel_values_{i} [1, 3, H, W], input_ids_{i} [T] (one image token), image_index_{i}."""
    data = np.load(path, allow_pickle=False)
    n = int(data["count"])
    return [{"pixel_values": data[f"pixel_values_{i}"], "input_ids": data[f"input_ids_{i}"],
             "image_index": int(data[f"image_index_{i}"]), "text": str(data[f"text_{i}"])} for i in range(n)]


def run_record(vision_ms: float, ttft_ms: float, token_times: list[float], visual_tokens: int, prompt_tokens: int) -> dict:
    """token_times: perf_counter seconds at which each new token was known (the first one ends the TTFT)."""
    return {
        "vision_ms": vision_ms,
        "prefill_ms": ttft_ms - vision_ms,
        "ttft_ms": ttft_ms,
        "token_ms": [(t - token_times[0]) * 1e3 for t in token_times],  # since the first token
        "visual_tokens": visual_tokens,
        "prompt_tokens": prompt_tokens,
    }


# ---------------------------------------------------------------------------------- transformers

class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def measure_transformers(spec: dict, samples: list[dict]) -> list[dict]:
    import torch

    from vtprune.models.loading import load_llava

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec.get("dtype", "float32"))  # bfloat16 for a 7B model: fp32 does not fit in 24 GB
    progress(f"loading the model ({spec.get('dtype', 'float32')})")
    model = load_llava(spec["model_dir"], dtype=dtype)
    cfg = model.config
    n = model.model.vision_tower.config.image_size // model.model.vision_tower.config.patch_size
    n = n * n

    def one(sample: dict, new_tokens: int) -> dict:
        ids = sample["input_ids"]
        i = sample["image_index"]
        expanded = np.concatenate([ids[:i], np.full(n, cfg.image_token_id, ids.dtype), ids[i + 1 :]])  # [T - 1 + n]
        input_ids = torch.from_numpy(expanded).unsqueeze(0)
        pixels = torch.from_numpy(sample["pixel_values"]).to(dtype)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.model.get_image_features(pixel_values=pixels)  # the vision tower + projector alone
            vision_ms = (time.perf_counter() - t0) * 1e3
            clock = _TokenClock()
            t0 = time.perf_counter()
            model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=cfg.text_config.pad_token_id or 0, streamer=clock)
        return run_record(vision_ms, (clock.times[0] - t0) * 1e3, clock.times, n, len(expanded))

    return _repeat(spec, samples, one)


# ---------------------------------------------------------------------------------- vtprune

@dataclass(frozen=True)
class PinnedBundle(Bundle):
    """The bundle with its vision graph swapped for the k-pinned copy, so only that one is ever loaded."""

    pinned_vision: Path = Path()

    def graph(self, which: str, precision: str) -> Path:
        return self.pinned_vision if which == "vision" else super().graph(which, precision)


def measure_vtprune(spec: dict, samples: list[dict]) -> list[dict]:
    from dataclasses import replace

    from vtprune.runtime.generate import Pipeline
    from vtprune.models.prompt import Prompt

    progress(f"opening the bundle's {spec['precision']} sessions")
    bundle = Bundle.open(spec["bundle"])
    if spec.get("pinned_vision"):  # Stage 1 with k pinned (benchmarks/bench_graphs.pin_k): k_min is that k
        bundle = PinnedBundle(bundle.root, bundle.manifest, Path(spec["pinned_vision"]))
    pipe = Pipeline(bundle, spec["precision"], "cpu", threads=spec["threads"], prefill_precision=spec.get("prefill_precision"))
    prune = replace(pipe.prune, k_min=spec["pin_k"]) if spec.get("pinned_vision") else pipe.prune

    def one(sample: dict, new_tokens: int) -> dict:
        prompt = Prompt(sample["text"], sample["input_ids"], sample["image_index"])
        times: list[float] = []
        result = pipe.generate(prompt, sample["pixel_values"], prune, max_new_tokens=new_tokens,
                               on_token=lambda _: times.append(time.perf_counter()), stop_at_eos=False)
        return run_record(result.vision_ms, result.vision_ms + result.prefill_ms, times, result.visual_tokens_kept,
                          result.prompt_tokens)

    return _repeat(spec, samples, one)


# ---------------------------------------------------------------------------------- common

def _repeat(spec: dict, samples: list[dict], one) -> list[dict]:
    """One warm-up run (few tokens), then `repeats` passes over every sample at the full length; a progress line
    after each run."""
    t0 = time.perf_counter()
    one(samples[0], spec["warmup_tokens"])
    progress(f"warm-up done ({spec['warmup_tokens']} tokens, {time.perf_counter() - t0:.1f} s)")
    runs = []
    for r in range(spec["repeats"]):
        for i, s in enumerate(samples):
            runs.append(one(s, spec["new_tokens"]))
            progress(f"sample {i + 1}/{len(samples)}, repeat {r + 1}/{spec['repeats']}, {describe(runs[-1])}")
    return runs


def describe(run: dict) -> str:
    """`TTFT 1.23 s, 8 tokens at 4.5 tokens/s` (the rate over the steps after the first token; TTFT in ms below 1 s)."""
    steps, ms, ttft = len(run["token_ms"]) - 1, run["token_ms"][-1], run["ttft_ms"]
    rate = f" at {steps / ms * 1e3:.1f} tokens/s" if steps > 0 and ms > 0 else ""
    return f"TTFT {f'{ttft:.0f} ms' if ttft < 1e3 else f'{ttft / 1e3:.2f} s'}, {steps + 1} token{'s' if steps else ''}{rate}"


SYSTEMS = {"transformers": measure_transformers, "vtprune": measure_vtprune}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    samples = load_samples(spec["samples"])
    from vtprune.runtime.memory import peak_rss_mb

    t0 = time.perf_counter()
    runs = SYSTEMS[spec["system"]](spec, samples)
    out = {"runs": runs, "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0, "pid": os.getpid()}
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
