"""Stage 2's eviction replayed in one teacher-forced pass equals the reference's token-by-token decode."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tiny_models import tiny_llava_config
from vtprune.models.embedded import batches, eviction_sim
from vtprune.models.config import PruneConfig
from vtprune.models.reference import PrunedLlava


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def _reference(model, prune, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Logits predicting answer[0..] (prefill's last, then one per decode step): [len(answer), V]."""
    ref = PrunedLlava(model, prune)
    logits, cache, _ = ref.prefill(ref.lm.embed_tokens(torch.tensor([prompt])))
    out = [logits[0, -1]]
    for t in answer[:-1]:
        out.append(ref.decode_step(torch.tensor([[t]]), cache)[0, -1])
    return torch.stack(out)


def _replayed(model, chats: list[tuple[list[int], list[tuple[list[int], list[int]]]]], prune, replay=True):
    """One padded batch of chats (prefix, [(prompt, answer), ...] as independent turns) in one pass.
    Returns each turn's logits predicting its answer tokens, like `_reference`."""
    rows, turns, spans = [], [], []
    for prefix, qas in chats:
        ids, turn, pos, where = list(prefix), [0] * len(prefix), list(range(len(prefix))), []
        for t, (prompt, answer) in enumerate(qas):
            where.append((len(ids) + len(prompt) - 1, len(answer)))
            ids += prompt + answer
            turn += [t + 1] * (len(prompt) + len(answer))
            pos += range(len(prefix), len(prefix) + len(prompt) + len(answer))
        rows.append((ids, turn, pos)), spans.append(where)
    S = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    turn = torch.full((len(rows), S), -1)
    position = torch.zeros(len(rows), S, dtype=torch.long)
    targets = torch.full((len(rows), S), -100)
    for b, (i, t, p) in enumerate(rows):
        ids[b, : len(i)], turn[b, : len(t)], position[b, : len(p)] = torch.tensor(i), torch.tensor(t), torch.tensor(p)
        for first, n in spans[b]:
            targets[b, first : first + n] = ids[b, first + 1 : first + n + 1]
    mask = batches.turn_mask(turn)
    lm = model.model.language_model
    lm.set_attn_implementation(eviction_sim.NAME)
    plan = eviction_sim.Plan.from_batch(targets, mask, prune=prune) if replay else None
    with torch.no_grad():
        hidden = lm(inputs_embeds=lm.embed_tokens(ids), attention_mask=mask, position_ids=position, stage2=plan).last_hidden_state
    lm.set_attn_implementation("sdpa")
    logits = model.lm_head(hidden)
    return [[logits[b, first : first + n] for first, n in spans[b]] for b in range(len(rows))]


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_one_pass_matches_the_reference_decode(model, policy):
    # a window shorter than every prompt; h2o at the paper's 0.5/0.5, where nothing is selected before the first
    # layer (the replay does not model that selection), snapkv at the default budget (its cut is replayed)
    paper = {"heavy_ratio": 0.5, "recent_ratio": 0.5} if policy == "h2o" else {}
    prune = PruneConfig(visual=False, policy=policy, snap_window=3, **paper)
    g = torch.Generator().manual_seed(1)
    word = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    prefix = [1] + word(9)
    chats = [
        (prefix, [(word(4), word(14)), (word(7), word(3)), (word(6), word(20))]),  # even and odd prompt lengths
        (prefix[:6], [(word(5), word(9))]),  # a shorter row, padded
    ]
    got = _replayed(model, chats, prune)
    plain = _replayed(model, chats, prune, replay=False)
    for b, (pre, qas) in enumerate(chats):
        for t, (prompt, answer) in enumerate(qas):
            want = _reference(model, prune, pre + prompt, answer)
            torch.testing.assert_close(got[b][t], want, atol=1e-5, rtol=1e-4)
    # the replay did evict: without it, the long answers' later logits are those of a full cache
    assert not torch.allclose(plain[0][0][-5:], got[0][0][-5:], atol=1e-3)
    want_full = _reference(model, PruneConfig.off(), prefix + chats[0][1][0][0], chats[0][1][0][1])
    torch.testing.assert_close(plain[0][0], want_full, atol=1e-5, rtol=1e-4)


def test_snapkv_replay_differs_from_h2o(model):
    """The window changes which prompt tokens survive: snapkv's replay is not h2o's under another name."""
    g = torch.Generator().manual_seed(4)
    prompt, answer = torch.randint(4, 120, (15,), generator=g).tolist(), torch.randint(4, 120, (20,), generator=g).tolist()
    chats = [([1], [(prompt, answer)])]
    h2o = _replayed(model, chats, PruneConfig(visual=False, policy="h2o"))[0][0]
    snap = _replayed(model, chats, PruneConfig(visual=False, policy="snapkv", snap_window=2))[0][0]
    assert not torch.allclose(h2o[-5:], snap[-5:], atol=1e-4)


def test_policies_without_a_replay_are_refused():
    mask = batches.turn_mask(torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="tova"):
        eviction_sim.Plan.from_batch(torch.full((1, 6), -100), mask, prune=PruneConfig(policy="tova"))


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_absolute_budgets(model, policy):
    """Budgets given as counts (7 heavy + 5 recent for a 12-token prompt), a 16-token answer."""
    prune = PruneConfig(visual=False, heavy_budget=7, recent_budget=5, policy=policy, snap_window=4)
    g = torch.Generator().manual_seed(2)
    prompt, answer = torch.randint(4, 120, (11,), generator=g).tolist(), torch.randint(4, 120, (16,), generator=g).tolist()
    got = _replayed(model, [([1], [(prompt, answer)])], prune)[0][0]
    torch.testing.assert_close(got, _reference(model, prune, [1] + prompt, answer), atol=1e-5, rtol=1e-4)


def test_snapkv_budget_below_the_prompt(model):
    """4 heavy + 3 recent for a 12-token prompt: snapkv runs the whole prompt and cuts its cache at the end by the
    window's scores (the reference's prefill); the replay cuts there too, before the first answer token."""
    prune = PruneConfig(visual=False, heavy_budget=4, recent_budget=3, policy="snapkv", snap_window=4)
    g = torch.Generator().manual_seed(5)
    prompt, answer = torch.randint(4, 120, (11,), generator=g).tolist(), torch.randint(4, 120, (16,), generator=g).tolist()
    got = _replayed(model, [([1], [(prompt, answer)])], prune)[0][0]
    torch.testing.assert_close(got, _reference(model, prune, [1] + prompt, answer), atol=1e-5, rtol=1e-4)


def test_replay_passes_gradient_to_the_kept_keys(model):
    lm = model.model.language_model
    lm.set_attn_implementation(eviction_sim.NAME)
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(3))
    targets = torch.full_like(ids, -100)
    targets[0, 9:19] = ids[0, 10:20]  # a 10-token answer after a 10-token prompt
    mask = batches.turn_mask(torch.ones_like(ids))
    plan = eviction_sim.Plan.from_batch(targets, mask)
    assert plan.start.tolist() == [10] and plan.length.tolist() == [10] and plan.heavy.tolist() == [5]
    emb = lm.embed_tokens(ids).detach().requires_grad_(True)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=torch.arange(20)[None], stage2=plan, output_attentions=True)
    lm.set_attn_implementation("sdpa")
    probs = out.attentions[-1]  # [1, Hq, S, S]
    assert float(probs[0, :, 19, :19].gt(0).sum(-1).max()) == 10  # the last query sees the cache of 10, and itself
    out.last_hidden_state[0, -1].sum().backward()
    assert float(emb.grad[0, :10].abs().sum()) > 0


def test_plan_spans_and_budgets_from_the_hard_prompt_length():
    # row 0: prefix of 4, turn 1 = 3 prompt + 2 answer tokens, turn 2 = 2 prompt + 5 answer tokens
    turn = torch.tensor([[0] * 4 + [1] * 5 + [2] * 7])
    targets = torch.full((1, 16), -100)
    targets[0, 6:8] = 7  # predicts answer tokens 7, 8
    targets[0, 10:15] = 7  # predicts answer tokens 11..15
    paper = PruneConfig(heavy_ratio=0.5, recent_ratio=0.5)
    plan = eviction_sim.Plan.from_batch(targets, batches.turn_mask(turn), dropped=torch.tensor([1]), prune=paper)
    assert plan.start.tolist() == [7, 11] and plan.length.tolist() == [2, 5]
    # prompts seen by inference: 4 + 3 - 1 = 6 and 4 + 2 - 1 = 5 tokens; budgets (0.5 each) round half up
    assert plan.heavy.tolist() == [3, 3] and plan.recent.tolist() == [3, 3]
