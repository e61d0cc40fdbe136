"""Stitching and generation on ONNX Runtime: preprocess -> vision graph -> splice -> prefill -> decode.

The image enters only at prefill; every decode step is the same call. The KV cache with its scores
lives in one dict of arrays (on CUDA: OrtValues on the device, bound with IO binding, so the cache is
not copied to the host each token); a bundle of the in-place form keeps it in fixed buffers that every
call writes where they are (runtime/slots.py). Stage 2 runs inside the decoder graph: the budgets are inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig  # models' torch-free modules: a plain dataclass,
from vtprune.models.preprocess import PreprocessConfig  # numpy + Pillow,
from vtprune.models.prompt import Prompt, PromptTokenizer  # tokenizers
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.session import open_session
from vtprune.runtime.slots import SlotCache


@dataclass
class Generation:
    token_ids: list[int]
    visual_tokens_kept: int
    visual_tokens_total: int
    prompt_tokens: int
    cache_tokens: int
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    kept_index: list[int] = field(default_factory=list)
    cache_lengths: list[int] = field(default_factory=list)  # after each decode step, for the budget check

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """logits [V] -> next token: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        outside = np.cumsum(sorted_p) - sorted_p > top_p
        p[order[outside]] = 0.0
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def check_graph_io(bundle: Bundle, sessions: dict) -> None:
    """Each graph's real inputs and outputs against the manifest: the io table's names, and the model dims
    (layers, KV heads, head_dim, hidden size, vocabulary) wherever the graph fixes a dimension, so a graph swapped
    for another valid one, or a hand-edited `model`, is one error before the first call."""
    m = bundle.manifest["model"]
    where = str(bundle.root / "manifest.json")
    for which, session in sessions.items():
        real = {"inputs": {i.name: i.shape for i in session.get_inputs()},
                "outputs": {o.name: o.shape for o in session.get_outputs()}}
        for side in ("inputs", "outputs"):
            listed = bundle.manifest["io"][which][side]
            missing = sorted(set(listed) - set(real[side]))
            # bundles exported before k_min was a listed input carry it as an overridable initializer
            extra = sorted(n for n in set(real[side]) - set(listed) if not (which == "vision" and n == "k_min"))
            if missing or extra:
                raise UserError(where, f"field io.{which}.{side} lists {len(listed)} names, the {which} graph has "
                                       f"{len(real[side])} (missing from the graph: {missing[:3]}, not listed: {extra[:3]}); "
                                       "re-export the bundle")
    decoder = {i.name: i.shape for i in sessions["decoder"].get_inputs()}
    layers = sum(1 for name in decoder if name.startswith("past.") and name.endswith(".key"))
    if layers != m["num_layers"]:
        raise UserError(where, f"field model.num_layers is {m['num_layers']}, the decoder graph has {layers} layers of cache inputs")
    expected = {"num_kv_heads": (1, m["num_kv_heads"]), "head_dim": (3, m["head_dim"])}
    for name, shape in decoder.items():
        if name.startswith("past.") and name.endswith(".key") and len(shape) == 4:
            for field, (axis, value) in expected.items():
                if isinstance(shape[axis], int) and shape[axis] != value:
                    raise UserError(where, f"field model.{field} is {value}, the decoder graph's {name} has {shape[axis]}")
    for shape, field in ((decoder.get("inputs_embeds"), "hidden_size"),
                         (next((o.shape for o in sessions["vision"].get_outputs() if o.name == "image_embeds"), None), "hidden_size"),
                         (next((o.shape for o in sessions["decoder"].get_outputs() if o.name == "logits"), None), "vocab_size")):
        if shape and isinstance(shape[-1], int) and shape[-1] != m[field]:
            raise UserError(where, f"field model.{field} is {m[field]}, a graph's dimension for it is {shape[-1]}")


def check_token_ids(tokenizer: PromptTokenizer, rows: int, where) -> None:
    """Every id the tokenizer can produce indexes the embedding table (a wrong table would read garbage or raise)."""
    top = max(tokenizer.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= rows:
        raise UserError(str(where), f"the tokenizer produces ids up to {top}; the bundle's embedding table has {rows} rows")


class Pipeline:
    """A bundle opened for inference: two sessions, the embedding table, tokenizer and preprocessing."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", provider: str | None = None, threads: int = 0,
                 cache_device: str | None = None, prefill_precision: str | None = None):
        """prefill_precision: a second decoder variant for the prompt (say int8 beside an int4 decode: on a CPU
        int8's MatMulInteger computes a long prompt several times faster than int4's MatMulNBits, while int4
        reads the fewest bytes per decoded token). Both variants' weights are then in memory. The image is part of
        the prompt: the vision graph runs at prefill_precision too when the bundle has it (an int4 bundle's vision
        is fp32, three times int8's time on a CPU)."""
        m = bundle.manifest
        self.bundle = bundle
        self.model = m["model"]
        self.prune = PruneConfig(**{"policy": "h2o", **m["prune"]})  # a bundle from before policies is H2O
        self.precision = {g: (precision if precision in m["graphs"][g] else "fp32") for g in ("vision", "decoder")}
        if prefill_precision in m["graphs"]["vision"]:
            self.precision["vision"] = prefill_precision
        if precision not in m["graphs"]["vision"] and precision not in m["graphs"]["decoder"]:
            bundle.graph("decoder", precision)  # raises the clear error naming what the bundle has
        self.vision, self.decoder = (
            open_session(bundle.graph(g, self.precision[g]), provider, threads, bundle.provider_options(g, self.precision[g]))
            for g in ("vision", "decoder")
        )
        check_graph_io(bundle, {"vision": self.vision, "decoder": self.decoder})
        self.prefill_precision = prefill_precision if prefill_precision not in (None, self.precision["decoder"]) else None
        self.prefill_decoder = self.decoder
        if self.prefill_precision:
            self.prefill_decoder = open_session(bundle.graph("decoder", prefill_precision), provider, threads,
                                                bundle.provider_options("decoder", prefill_precision))
            check_graph_io(bundle, {"vision": self.vision, "decoder": self.prefill_decoder})
        embed = m["embed_tokens"]
        self.embed_tokens = bundle.array(embed)  # [V, D]
        tok = m["tokenizer"]
        self.tokenizer = PromptTokenizer.from_files(bundle.path(tok["file"]), bundle.path(tok["config"]) if tok.get("config") else None)
        check_token_ids(self.tokenizer, len(self.embed_tokens), bundle.path(tok["file"]))
        self.preprocess = PreprocessConfig.from_file(bundle.path(m["preprocessor"]))
        self.template = m["prompt_template"]
        self.num_layers = self.model["num_layers"]
        self.takes_image_span = any(i.name == "image_span" for i in self.decoder.get_inputs())  # policy vfloor
        self.slots = m.get("decoder_form") == "inplace"  # the cache is fixed buffers written in place (runtime/slots.py)
        # Where the KV cache lives between steps. On a GPU it stays there (IO binding); on the CPU plain
        # arrays are as fast. `cache_device="cpu"` forces the IO-binding path on the CPU (tests use it).
        on_gpu = self.decoder.get_providers()[0] != "CPUExecutionProvider"
        self.cache_device = cache_device or ("cuda" if on_gpu else None)

    # ---------------------------------------------------------------- the three steps
    def encode_image(self, pixel_values: np.ndarray, k_min: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values [1, 3, H, W] -> (image_embeds [1, k, D], kept_index [1, k]); k_min defaults to the bundle's."""
        if pixel_values.shape[0] != 1:
            raise ValueError(f"one image at a time: k differs per image (got a batch of {pixel_values.shape[0]})")
        k_min = self.prune.k_min if k_min is None else k_min
        feed = {"pixel_values": pixel_values.astype(np.float32), "k_min": np.array(k_min, dtype=np.int64)}
        embeds, kept, _ = self.vision.run(None, feed)
        return embeds, kept

    def splice(self, prompt: Prompt, image_embeds: np.ndarray) -> np.ndarray:
        """Token embeddings with the k image embeddings at the image token: [1, T - 1 + k, D]."""
        tokens = self.embed_tokens[prompt.input_ids]  # [T, D]
        i = prompt.image_index
        return np.concatenate([tokens[:i], image_embeds[0].astype(tokens.dtype), tokens[i + 1 :]])[None]

    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> dict | SlotCache:
        """capacity: slots of an in-place cache (default: the context; `cache_capacity` gives what a budget needs)."""
        H, Dh = self.model["num_kv_heads"], self.model["head_dim"]
        if self.slots:
            return SlotCache.empty(self.num_layers, H, Dh, capacity or self.model["context_length"], self.cache_device or "cpu")
        cache = {}
        for i in range(self.num_layers):
            cache[f"past.{i}.key"] = np.zeros((batch, H, 0, Dh), np.float32)
            cache[f"past.{i}.value"] = np.zeros((batch, H, 0, Dh), np.float32)
            cache[f"past.{i}.score"] = np.zeros((batch, H, 0), np.float32)
        if self.cache_device:
            cache = {k: ort.OrtValue.ortvalue_from_numpy(v, self.cache_device, 0) for k, v in cache.items()}
        return cache

    def step(self, embeds: np.ndarray, positions: np.ndarray, cache: dict, budget: tuple[int, int],
             image_span: tuple[int, int] = (0, 0), session: ort.InferenceSession | None = None):  # fmt: skip
        """One decoder call: returns (logits [B, V], kept_positions [B, S'], the new cache). image_span: position
        ids [first, end) of the image tokens, read by graphs whose eviction policy keeps a floor of them.
        `session`: the decoder variant to run (default: the decode one)."""
        session = session or self.decoder
        feed = {"inputs_embeds": embeds.astype(np.float32), "position_ids": positions.astype(np.int64),
                "heavy_budget": np.array(budget[0], np.int64), "recent_budget": np.array(budget[1], np.int64)}
        if self.takes_image_span:
            feed["image_span"] = np.array(image_span, np.int64)
        if isinstance(cache, SlotCache):  # the graph writes the buffers in place; only logits come back
            if min(sum(budget), cache.length + embeds.shape[1]) > cache.capacity:  # KVUpdate would keep fewer
                raise ValueError(f"the in-place cache has {cache.capacity} slots; this call keeps "
                                 f"{min(sum(budget), cache.length + embeds.shape[1])} entries (size it with cache_capacity)")
            outs = cache.run(session, feed)
            cache.length = min(cache.length + outs["kept_positions"].shape[1], sum(budget))  # what KVUpdate keeps
            return outs["logits"], outs["kept_positions"], cache
        names = [o.name for o in session.get_outputs()]
        if self.cache_device is None:
            outs = dict(zip(names, session.run(names, {**feed, **cache})))
        else:  # the cache stays on its device: bind it in and out, copy only logits and positions to the host
            binding = session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for name, value in cache.items():
                binding.bind_ortvalue_input(name, value)
            for name in names:
                binding.bind_output(name, "cpu" if not name.startswith("present.") else self.cache_device)
            session.run_with_iobinding(binding)
            values = dict(zip(names, binding.get_outputs()))
            outs = {n: (v.numpy() if not n.startswith("present.") else v) for n, v in values.items()}
        new_cache = {name.replace("present.", "past.", 1): outs[name] for name in names if name.startswith("present.")}
        return outs["logits"], outs["kept_positions"], new_cache

    def budget(self, prompt_len: int, prune: PruneConfig) -> tuple[int, int]:
        """(heavy, recent) for this prompt; without Stage 2 a budget the cache can never reach."""
        if not prune.text:
            return self.model["context_length"] + 1, 0
        return prune.budgets(prompt_len)

    def cache_capacity(self, budget: tuple[int, int], longest: int) -> int:
        """Slots an in-place cache needs for a sequence of at most `longest` positions under `budget`."""
        return max(1, min(sum(budget), longest, self.model["context_length"]))

    def fork_cache(self, cache: dict | SlotCache, capacity: int | None = None) -> dict | SlotCache:
        """A cache that later steps can extend without changing `cache` (a chat's shared image prefix). `step`
        returns new arrays and never writes its inputs, so sharing them is a copy; an in-place cache is copied
        (into `capacity` slots, at least what it holds)."""
        return cache.fork(capacity) if isinstance(cache, SlotCache) else dict(cache)

    def prefill(self, embeds: np.ndarray, start: int, cache: dict, budget: tuple[int, int],
                image_span: tuple[int, int] = (0, 0)):
        """Feed S new embeddings [1, S, D] at positions start..start+S-1 after what `cache` holds.

        A fresh prompt starts at 0 on an empty cache; a chat's later turn starts where the previous one stopped,
        so earlier turns are never run again. Returns (logits [1, V], kept_positions [1, S'], cache)."""
        positions = np.arange(start, start + embeds.shape[1])[None]  # [1, S]
        return self.step(embeds, positions, cache, budget, image_span, self.prefill_decoder)

    def decode(self, logits: np.ndarray, cache: dict, position: int, budget: tuple[int, int], max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None,
               on_token: Callable[[int], None] | None = None, stop_at_eos: bool = True,
               should_stop: Callable[[], bool] | None = None,
               image_span: tuple[int, int] = (0, 0)) -> tuple[list[int], list[int], dict]:
        """Sample up to `max_new_tokens` from `logits` on; returns (tokens, cache length after each step, cache).

        The last token returned is never fed to the decoder (nothing reads its logits), so the cache holds
        positions up to `position + len(tokens) - 2`. `should_stop` (checked before each step) ends the answer early,
        leaving the cache as consistent as at any token boundary (a chat's Ctrl-C, a server's closed connection)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        eos = self.tokenizer.eos_token_id
        tokens: list[int] = []
        lengths: list[int] = []
        for i in range(max_new_tokens):
            token = sample(logits[0], temperature, top_p, rng)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if (stop_at_eos and token == eos) or i == max_new_tokens - 1 or (should_stop is not None and should_stop()):
                break
            logits, _, cache = self.step(self.embed_tokens[[token]][None], np.array([[position]]), cache, budget, image_span)
            position += 1
            lengths.append(cache_length(cache))
        return tokens, lengths, cache

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompt: Prompt,
        pixel_values: np.ndarray,
        prune: PruneConfig | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: Callable[[int], None] | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        prune = prune or self.prune
        rng = np.random.default_rng(seed)
        n = self.model["num_patches"]
        t0 = time.perf_counter()
        image_embeds, kept = self.encode_image(pixel_values, k_min=prune.k_min if prune.visual else n)
        t1 = time.perf_counter()
        embeds = self.splice(prompt, image_embeds)  # [1, L, D]
        L = embeds.shape[1]
        budget = self.budget(L, prune)
        span = (prompt.image_index, prompt.image_index + int(kept.shape[1]))  # the image's positions
        cache = self.empty_cache(capacity=self.cache_capacity(budget, L + max_new_tokens))
        logits, kept_positions, cache = self.prefill(embeds, 0, cache, budget, span)
        t2 = time.perf_counter()
        tokens, lengths, cache = self.decode(logits, cache, L, budget, max_new_tokens, temperature, top_p, rng,
                                             on_token, stop_at_eos, image_span=span)
        t3 = time.perf_counter()
        return Generation(
            token_ids=tokens,
            visual_tokens_kept=int(kept.shape[1]),
            visual_tokens_total=n,
            prompt_tokens=int(kept_positions.shape[1]),
            cache_tokens=cache_length(cache),
            vision_ms=(t1 - t0) * 1000,
            prefill_ms=(t2 - t1) * 1000,
            decode_ms=(t3 - t2) * 1000,
            kept_index=kept[0].tolist(),
            cache_lengths=lengths,
        )


def cache_length(cache: dict | SlotCache) -> int:
    """Positions held by layer 0's cache (arrays, device OrtValues, or an in-place cache's count)."""
    if isinstance(cache, SlotCache):
        return cache.length
    key = cache["past.0.key"]
    return int(key.shape[2] if isinstance(key, np.ndarray) else key.shape()[2])
