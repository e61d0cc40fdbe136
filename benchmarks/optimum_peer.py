"""The Optimum peer's timings, run by the Python of Optimum's own venv (no vtprune import: that venv has numpy and
onnxruntime): `python optimum_peer.py SPEC.json OUT.json`.

The peer is what a Hugging Face user gets from `optimum-cli export onnx --task text-generation-with-past` on the
LLaVA's text part (fp32, or dynamic int8 from Optimum's ORTQuantizer), behind the unpruned vision graph: vision
graph -> embedding graph (the decoder's own token table, the 576 image features spliced in) -> the decoder, whose
embedding Gather was cut so it takes `inputs_embeds` (benchmarks/optimum_build.py). The past key/value loop is
the one ORTModelForCausalLM runs: an empty past [1, kv_heads, 0, head_dim] at prefill, an attention mask of ones
over past + new tokens, position ids counted on, each step's presents fed back as the next past. Greedy with EOS
masked (what ORTModelForCausalLM.generate does with min_new_tokens, and the transformers system with it); the same
record keys as measure.py's workers, plus each run's tokens.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

PROGRESS = "vtprune-bench-progress: "  # must equal vtprune.benchmarks.measure.PROGRESS (checked by a test)


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


class Peer:
    def __init__(self, spec: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        session = lambda path: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # noqa: E731
        self.vision = session(spec["vision"])
        self.embedding = session(spec["embedding"])
        self.decoder = session(spec["decoder"])
        self.past_names = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.decoder.get_outputs() if o.name.startswith("present.")]
        names = {o.name: k for k, o in enumerate(self.decoder.get_outputs())}
        self.present_index = [names[n.replace("past_key_values.", "present.")] for n in self.past_names]
        self.logits_index = names["logits"]
        shape = self.decoder.get_inputs()[[i.name for i in self.decoder.get_inputs()].index(self.past_names[0])].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        width = self.embedding.get_inputs()[1].shape[1]
        self.no_image = np.zeros((0, int(width)), np.float32)
        self.eos = [int(t) for t in spec.get("eos_token_ids", [])]

    def pick(self, logits: np.ndarray) -> int:
        """Greedy, EOS masked: every run makes its full length, as transformers' min_new_tokens and GenAI's min_length do."""
        logits = logits.copy()
        logits[self.eos] = -np.inf
        return int(np.argmax(logits))

    def step(self, embeds: np.ndarray, past: list[np.ndarray], start: int) -> tuple[int, list[np.ndarray]]:
        n = embeds.shape[1]
        feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, start + n), np.int64),
                "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
        feed.update(zip(self.past_names, past))
        out = self.decoder.run(None, feed)
        return self.pick(out[self.logits_index][0, -1]), [out[k] for k in self.present_index]

    def generate(self, ids: np.ndarray, pixels: np.ndarray, new_tokens: int) -> dict:
        t0 = time.perf_counter()
        features = self.vision.run(None, {"pixel_values": pixels})[0]
        t_vision = time.perf_counter()
        embeds = self.embedding.run(None, {"input_ids": ids[None], "image_features": features})[0]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        token, past = self.step(embeds, [empty] * len(self.past_names), 0)
        times, tokens = [time.perf_counter()], [token]
        position = len(ids)
        while len(tokens) < new_tokens:
            embeds = self.embedding.run(None, {"input_ids": np.array([[token]], np.int64), "image_features": self.no_image})[0]
            token, past = self.step(embeds, past, position)
            position += 1
            times.append(time.perf_counter())
            tokens.append(token)
        vision_ms, ttft_ms = (t_vision - t0) * 1e3, (times[0] - t0) * 1e3
        return {"vision_ms": vision_ms, "prefill_ms": ttft_ms - vision_ms, "ttft_ms": ttft_ms,
                "token_ms": [(t - times[0]) * 1e3 for t in times], "visual_tokens": int(features.shape[0]),
                "prompt_tokens": int(len(ids)), "tokens": tokens}


def main(argv: list[str]) -> int:
    import onnxruntime as ort

    spec = json.loads(Path(argv[0]).read_text())
    data = np.load(spec["samples"], allow_pickle=False)
    samples = [(data[f"expanded_ids_{i}"].astype(np.int64), data[f"pixel_values_{i}"]) for i in range(int(data["count"]))]
    progress(f"opening Optimum's {spec.get('precision', 'fp32')} decoder")
    peer = Peer(spec)
    t0 = time.perf_counter()
    peer.generate(*samples[0], spec["warmup_tokens"])
    progress(f"warm-up done ({spec['warmup_tokens']} tokens, {time.perf_counter() - t0:.1f} s)")
    runs = []
    for r in range(spec["repeats"]):
        for i, (ids, pixels) in enumerate(samples):
            runs.append(peer.generate(ids, pixels, spec["new_tokens"]))
            run = runs[-1]
            steps, ms = len(run["token_ms"]) - 1, run["token_ms"][-1]
            rate = f" at {steps / ms * 1e3:.1f} tokens/s" if steps > 0 and ms > 0 else ""
            ttft = run["ttft_ms"]
            progress(f"sample {i + 1}/{len(samples)}, repeat {r + 1}/{spec['repeats']}, TTFT "
                     f"{f'{ttft:.0f} ms' if ttft < 1e3 else f'{ttft / 1e3:.2f} s'}, {steps + 1} token{'s' if steps else ''}{rate}")
    versions = {"onnxruntime": ort.__version__}
    try:
        from importlib.metadata import version

        versions.update({name: version(name) for name in ("optimum-onnx", "optimum", "transformers")})
    except Exception:  # noqa: BLE001 - versions are a note, never a failure
        pass
    out = {"runs": runs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "versions": versions}
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
