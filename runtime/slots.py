"""The in-place decoder's KV cache (export/inplace.py): fixed buffers that every decoder call writes in place.

Each layer holds key/value [1, Hkv, C, Dh], score [1, Hkv, C] and pos [1, Hkv, C] (the position id in each slot,
-1 = empty) as OrtValues on their device. A session binds them once, each as its `past.*` input and its
`present.*` output (IO binding), so a decode step hands ONNX Runtime only the new token's embedding, its
position and the budgets, and takes back only the logits: the graph writes the one slot per head that eviction
freed, and the cache never crosses Python.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

FIELDS = ("key", "value", "score", "pos")


class SlotCache:
    def __init__(self, values: dict[str, ort.OrtValue], capacity: int, length: int, device: str):
        self.values = values  # past.{i}.{field} -> OrtValue
        self.capacity = capacity
        self.length = length  # entries held (every head holds as many), kept by the budget rule as the graph keeps it
        self.device = device
        self._bindings: dict[ort.InferenceSession, tuple[ort.IOBinding, list[str]]] = {}  # keyed by the session itself

    @classmethod
    def empty(cls, num_layers: int, kv_heads: int, head_dim: int, capacity: int, device: str = "cpu") -> "SlotCache":
        arrays = {}
        for i in range(num_layers):
            arrays[f"past.{i}.key"] = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
            arrays[f"past.{i}.value"] = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
            arrays[f"past.{i}.score"] = np.zeros((1, kv_heads, capacity), np.float32)
            arrays[f"past.{i}.pos"] = np.full((1, kv_heads, capacity), -1, np.int64)
        return cls._from_arrays(arrays, capacity, 0, device)

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], capacity: int, length: int, device: str) -> "SlotCache":
        return cls({k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in arrays.items()}, capacity, length, device)

    def run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder call on this cache: feed (the new tokens, positions, budgets) -> the other outputs (logits,
        kept_positions) as arrays; the buffers are updated where they are."""
        if not isinstance(session, ort.InferenceSession):  # a wrapper (quantization's calibration recorder): arrays
            names = [o.name for o in session.get_outputs()]
            outs = dict(zip(names, session.run(names, {**feed, **self.arrays()})))
            for name, value in self.values.items():
                value.update_inplace(outs[name.replace("past.", "present.", 1)])
            return {n: v for n, v in outs.items() if not n.startswith("present.")}
        binding, names = self._binding(session)
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in names:  # logits, kept_positions: a new host array each call (rebinding keeps their place)
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: the cache's outputs, then `names`
        return {name: outputs[len(self.values) + j].numpy() for j, name in enumerate(names)}

    def _binding(self, session: ort.InferenceSession) -> tuple[ort.IOBinding, list[str]]:
        """The session's binding of this cache (made once): each buffer both its past.* input and present.* output."""
        if session not in self._bindings:
            binding = session.io_binding()
            for name, value in self.values.items():
                binding.bind_ortvalue_input(name, value)
            for name, value in self.values.items():
                binding.bind_ortvalue_output(name.replace("past.", "present.", 1), value)
            names = [o.name for o in session.get_outputs() if not o.name.startswith("present.")]
            self._bindings[session] = (binding, names)
        return self._bindings[session]

    def arrays(self) -> dict[str, np.ndarray]:
        """Host copies of the buffers (OrtValue.numpy() of a CPU value is a view the next call overwrites)."""
        return {k: v.numpy().copy() for k, v in self.values.items()}

    def held(self) -> int:
        """Entries held, read from layer 0's positions (a copy from the device: for checks, not per step)."""
        return int((self.values["past.0.pos"].numpy()[0, 0] >= 0).sum())

    def fork(self, capacity: int | None = None) -> "SlotCache":
        """An independent copy, of at least this capacity and at least the entries held (a chat's shared image
        prefix, extended by each question); held entries go to the first slots (slot order is free)."""
        capacity = max(capacity or self.capacity, self.length)
        arrays = self.arrays()
        out = {}
        for name, a in arrays.items():
            layer = name.rsplit(".", 1)[0]
            pos = arrays[f"{layer}.pos"]  # [1, H, C]
            order = np.argsort(pos < 0, axis=-1, kind="stable")[..., : min(capacity, pos.shape[-1])]  # held slots first
            kept = np.take_along_axis(a, order[..., None] if a.ndim == 4 else order, axis=2)
            pad = [(0, 0)] * a.ndim
            pad[2] = (0, capacity - kept.shape[2])
            out[name] = np.pad(kept, pad, constant_values=-1 if name.endswith(".pos") else 0)
        return self._from_arrays(out, capacity, self.length, self.device)
