"""The in-place decoder form (export/inplace.py): KVUpdate against its NumPy oracle and KVEvict's rule on hand-made
caches, and the whole decoder against the PyTorch reference through prefill and eviction, with its buffers bound
as both input and output (IO binding), as the runtime runs it."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vtprune.export.decoder import export_decoder
from vtprune.export.eviction_op import evict_reference
from vtprune.export.inplace import kv_update_model, kv_update_reference
from vtprune.models.config import PruneConfig
from vtprune.models.loading import load_llava
from vtprune.models.reference import PrunedLlava

from decoder_graphs import label_sizes

TOL = 1e-4
HEAVY, RECENT = 4, 3


def _by_position(key, value, score, pos):
    """Each row's held entries in position order: (key, value, score, pos) lists per row, so caches whose slots
    are laid out differently compare equal when they hold the same entries."""
    rows = []
    for b in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            held = np.flatnonzero(pos[b, h] >= 0)
            order = held[np.argsort(pos[b, h, held])]
            rows.append((key[b, h, order], value[b, h, order], score[b, h, order], pos[b, h, order]))
    return rows


def _random_case(rng, ties: bool):
    H, C, S, Dh = int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 6)), 2
    held = int(rng.integers(0, C + 1))
    pos = np.full((1, H, C), -1, np.int64)
    base = np.sort(rng.choice(50, size=held, replace=False))  # every head holds as many entries, in its own slots
    for h in range(H):
        pos[0, h, rng.permutation(C)[:held]] = base
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    score = (rng.integers(0, 3, (1, H, C + S)) if ties else rng.random((1, H, C + S))).astype(np.float32)
    return dict(key=f(1, H, C, 2), value=f(1, H, C, Dh), slot_pos=pos, score_all=score, new_key=f(1, H, S, Dh),
                new_value=f(1, H, S, Dh), new_pos=(60 + np.arange(S))[None], budget_heavy=np.array(int(rng.integers(0, 5))),
                budget_recent=np.array(int(rng.integers(0, 4))), ready=np.array(False))


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_kv_update_keeps_what_kv_evict_keeps(policy, ties):
    """On 300 random caches (empty slots anywhere, 1-5 new tokens, budgets below and above what is held):
    KVUpdate holds exactly the entries its oracle holds, and those are KVEvict's (evict_reference) on the
    position-ordered cache; entries it keeps never move, and slots it frees but does not fill are marked empty."""
    session = ort.InferenceSession(kv_update_model(policy).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 300:
        c = _random_case(rng, ties)
        C, S = c["slot_pos"].shape[-1], c["new_pos"].shape[-1]
        heavy, recent = int(c["budget_heavy"]), int(c["budget_recent"])
        held = int((c["slot_pos"][0, 0] >= 0).sum())
        if heavy + recent == 0 or min(heavy + recent, held + S) > C:
            continue  # a buffer too small for its budget is the runtime's to avoid
        checked += 1
        got = session.run(None, c)
        ref = kv_update_reference(c["key"], c["value"], c["slot_pos"], c["score_all"], c["new_key"], c["new_value"],
                                  c["new_pos"], heavy, recent, policy)
        for g, r in zip(_by_position(*got), _by_position(*ref)):
            for a, b in zip(g, r):
                np.testing.assert_array_equal(a, b)
        # KVEvict's rule on the same entries in position order (its cache is position-ordered by construction)
        for h in range(c["slot_pos"].shape[1]):
            slots = np.flatnonzero(c["slot_pos"][0, h] >= 0)
            slots = slots[np.argsort(c["slot_pos"][0, h, slots])]
            entries = np.concatenate([c["slot_pos"][0, h, slots], c["new_pos"][0]])[None, None]  # [1, 1, P]
            scores = np.concatenate([c["score_all"][0, h, slots], c["score_all"][0, h, C:]])[None, None]
            keys = np.concatenate([c["key"][0, h, slots], c["new_key"][0, h]])[None, None]
            k, _, s = evict_reference(keys, keys, scores, heavy, recent, policy)
            row = _by_position(*got)[h]
            np.testing.assert_array_equal(row[0], k[0, 0])
            np.testing.assert_array_equal(row[2], s[0, 0])
            kept = np.isin(c["slot_pos"][0, h], row[3]) & (c["slot_pos"][0, h] >= 0)
            np.testing.assert_array_equal(got[3][0, h][kept], c["slot_pos"][0, h][kept])  # kept entries stay put
            np.testing.assert_array_equal(got[0][0, h][kept], c["key"][0, h][kept])
            assert entries.shape[-1] - k.shape[-2] == (got[3][0, h] < 0).sum() - (c["slot_pos"][0, h] < 0).sum() + S


def test_a_decode_step_on_a_full_buffer_writes_one_slot_per_head():
    """The steady state Stage 2 is in for most of an answer: one new token, one eviction, one slot written."""
    session = ort.InferenceSession(kv_update_model("h2o").SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    H, C, Dh = 4, 12, 8
    pos = np.stack([rng.permutation(C) for _ in range(H)])[None].astype(np.int64)  # [1, H, C]: a full, shuffled buffer
    feed = dict(key=rng.standard_normal((1, H, C, Dh)).astype(np.float32), value=rng.standard_normal((1, H, C, Dh)).astype(np.float32),
                slot_pos=pos, score_all=rng.random((1, H, C + 1)).astype(np.float32),
                new_key=rng.standard_normal((1, H, 1, Dh)).astype(np.float32), new_value=rng.standard_normal((1, H, 1, Dh)).astype(np.float32),
                new_pos=np.array([[C]]), budget_heavy=np.array(8), budget_recent=np.array(4), ready=np.array(False))
    key, value, score, new_pos = session.run(None, feed)
    changed = (new_pos != pos).sum(-1)  # [1, H]
    assert changed.tolist() == [[1] * H]
    assert ((new_pos == C).sum(-1) == 1).all()  # the new token is held (it is in the recent window)
    assert ((key != feed["key"]).any(-1).sum(-1) == 1).all()


@pytest.fixture(scope="module")
def mha_llava_dir(tmp_path_factory):
    from tiny_models import save_tiny_llava, save_tiny_tokenizer

    return save_tiny_tokenizer(save_tiny_llava(tmp_path_factory.mktemp("tiny-mha-inplace"), gqa=False))


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
@pytest.mark.parametrize("grouped", [True, False], ids=["gqa", "mha"])
def test_inplace_decoder_matches_the_reference_in_place(policy, grouped, tiny_llava_dir, mha_llava_dir):
    """Prefill (the budget cuts the prompt) and 24 decode steps with eviction: logits within 1e-4, every layer's
    held keys, values, scores and positions equal to the reference's cache, with the buffers bound as input and
    output of every decode step, written where they are (the same memory before and after)."""
    model = PrunedLlava(load_llava(tiny_llava_dir if grouped else mha_llava_dir),
                        PruneConfig(visual=False, policy=policy, heavy_budget=HEAVY, recent_budget=RECENT))
    proto = export_decoder(model, form="inplace")
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    L = len(model.lm.layers)
    assert ops["KVUpdate"] == L and ops["KVEvict"] == 0 and ops["PrefillSelect"] == (policy != "snapkv")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = model.config.text_config
    Hkv, Dh, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    C = HEAVY + RECENT
    buffers = {}
    for i in range(L):
        buffers[f"past.{i}.key"] = np.zeros((1, Hkv, C, Dh), np.float32)
        buffers[f"past.{i}.value"] = np.zeros((1, Hkv, C, Dh), np.float32)
        buffers[f"past.{i}.score"] = np.zeros((1, Hkv, C), np.float32)
        buffers[f"past.{i}.pos"] = np.full((1, Hkv, C), -1, np.int64)
    values = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in buffers.items()}
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past.", "present.", 1), value)
    binding.bind_cpu_input("heavy_budget", np.array(HEAVY))
    binding.bind_cpu_input("recent_budget", np.array(RECENT))
    address = {n: v.data_ptr() for n, v in values.items()}

    def run(embeds, positions):
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits", "cpu")
        binding.bind_output("kept_positions", "cpu")
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        assert all(o.data_ptr() == address[n] for o, n in zip(outs, values))  # written where they are
        return outs[len(values)].numpy(), outs[len(values) + 1].numpy()

    def cache_matches(cache):
        for i in range(L):
            held = _by_position(*(values[f"past.{i}.{f}"].numpy() for f in ("key", "value", "score", "pos")))
            for h, (k, v, s, p) in enumerate(held):
                np.testing.assert_array_equal(p, cache.positions[i][0, h].numpy())
                np.testing.assert_allclose(k, cache.keys[i][0, h].numpy(), atol=TOL, rtol=0)
                np.testing.assert_allclose(v, cache.values[i][0, h].numpy(), atol=TOL, rtol=0)
                np.testing.assert_allclose(s, cache.scores[i][0, h].numpy(), atol=TOL, rtol=1e-5)

    embeds = torch.randn(1, 12, D, generator=torch.Generator().manual_seed(1))  # 12 > 7: the budget cuts the prompt
    logits, cache, positions = model.prefill(embeds)
    got, kept = run(embeds.numpy(), np.arange(12)[None])
    np.testing.assert_allclose(got, logits[:, -1].numpy(), atol=TOL, rtol=0)
    assert kept.tolist() == positions.tolist()
    cache_matches(cache)
    for step in range(24):
        token = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(100 + step))
        position = cache.next_position
        cache.next_position += 1
        with torch.no_grad():
            ref = model._decoder(token, torch.tensor([[position]]), cache)
        got, _ = run(token.numpy(), np.array([[position]]))
        np.testing.assert_allclose(got, ref[:, -1].numpy(), atol=TOL, rtol=0)
        cache_matches(cache)


def test_inplace_form_refuses_vfloor(tiny_llava_dir):
    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(policy="vfloor"))
    with pytest.raises(ValueError, match="vfloor"):
        export_decoder(model, form="inplace")


def test_inplace_graph_checks_and_every_labelled_dimension_names_one_size(tiny_llava_dir):
    """The checker passes (full check: KVUpdate's body type-checks), and every labelled tensor of a prefill that
    PrefillSelect shortens (seq 12 -> kept 7) into a 7-slot buffer has the size its labels say (ORT's memory
    planner reuses buffers by symbolic dimension)."""
    import onnx

    model = PrunedLlava(load_llava(tiny_llava_dir), PruneConfig(visual=False, policy="h2o"))
    proto = export_decoder(model, form="inplace")
    onnx.checker.check_model(proto, full_check=True)
    labelled = [v for v in proto.graph.value_info if any(d.dim_param for d in v.type.tensor_type.shape.dim)]
    assert labelled
    proto.graph.output.extend(labelled)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cfg = model.config.text_config
    Hkv, Dh = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 12, cfg.hidden_size)).astype(np.float32),
            "position_ids": np.arange(12)[None], "heavy_budget": np.array(4), "recent_budget": np.array(3)}
    for i in range(len(model.lm.layers)):
        feed.update({f"past.{i}.key": np.zeros((1, Hkv, 7, Dh), np.float32), f"past.{i}.value": np.zeros((1, Hkv, 7, Dh), np.float32),
                     f"past.{i}.score": np.zeros((1, Hkv, 7), np.float32), f"past.{i}.pos": np.full((1, Hkv, 7), -1, np.int64)})
    sizes = label_sizes(session, feed)
    assert sizes["capacity"] == {7} and sizes["kept"] == {7} and sizes["seq"] == {12}
    assert {label: s for label, s in sizes.items() if len(s) > 1} == {}
