"""`vtprune chat`: the first turn of a conversation is `vtprune run`; later turns reuse the KV cache (no second
vision pass, no re-prefill), follow transformers' chat template, and equal a full prefill where nothing is evicted."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from vtprune.cli import main
from vtprune.models.config import PruneConfig
from vtprune.models.preprocess import preprocess_file
from vtprune.models.prompt import Prompt
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.chat import Conversation
from vtprune.runtime.generate import Pipeline

from tiny_models import save_tiny_image

QUESTIONS = ["what is red ?", "what is in the image ?", "is the circle blue ?"]


def _run_tokens(capsys, bundle, image, question, *extra):
    assert main(["run", "--bundle", str(bundle), "--image", str(image), "--prompt", question, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _chat(monkeypatch, capsys, bundle, image, lines, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", "--bundle", str(bundle), "--image", str(image), "--json", *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_chat_through_real_stdin_answers_like_run_whenever_the_history_is_empty(tiny_bundle, tmp_path, capsys):
    """Turn 1, the turn after /reset and the turn after /image are each a `vtprune run` (same prompt ids, tokens)."""
    a, b = save_tiny_image(tmp_path / "a.png", seed=1), save_tiny_image(tmp_path / "b.png", seed=2)
    stdin = "\n".join([QUESTIONS[0], QUESTIONS[1], "/stats", "/reset", QUESTIONS[1], f"/image {tmp_path / 'missing.png'}",
                       f"/image {b}", QUESTIONS[2], "/nonsense", QUESTIONS[0]]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "vtprune.cli", "chat", "--bundle", str(tiny_bundle), "--image", str(a),
                           "--max-new-tokens", "8", "--json"], input=stdin, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = json.loads(proc.stdout)["events"]
    answers = [e for e in events if e["kind"] == "answer"]
    assert [e["question"] for e in answers] == [QUESTIONS[0], QUESTIONS[1], QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]]
    fresh = {0: a, 2: a, 3: b}  # answer index -> image, where the history was empty
    for i, image in fresh.items():
        expected = _run_tokens(capsys, tiny_bundle, image, answers[i]["question"], "--max-new-tokens", "8")
        assert answers[i]["token_ids"] == expected["token_ids"], i
        assert answers[i]["kept_index"] == expected["kept_index"] and answers[i]["prompt_tokens"] == expected["prompt_tokens"]
    assert answers[1]["fed_tokens"] < answers[0]["fed_tokens"] and answers[1]["vision_ms"] == 0
    errors = [e for e in events if e["kind"] == "error"]
    assert [e["where"] for e in errors] == [str(tmp_path / "missing.png"), "/nonsense"]
    assert [line for line in proc.stderr.splitlines() if line.startswith("vtprune: error:")] == [
        f"vtprune: error: {e['where']}: {e['message']}" for e in errors]
    stats = next(e for e in events if e["kind"] == "stats")
    assert stats["turns"] == 2 and stats["cache_tokens"] <= stats["cache_budget"]


class Counting:
    """Records every vision pass and every decoder call's new-token count on one Pipeline."""

    def __init__(self, pipe: Pipeline):
        self.vision_calls, self.fed = 0, []
        encode, step = pipe.encode_image, pipe.step

        def counted_encode(*a, **k):
            self.vision_calls += 1
            return encode(*a, **k)

        def counted_step(embeds, *args, **kwargs):
            self.fed.append(int(embeds.shape[1]))
            return step(embeds, *args, **kwargs)

        pipe.encode_image, pipe.step = counted_encode, counted_step


def test_later_turns_do_no_vision_pass_and_never_prefill_an_earlier_turn_again(tiny_bundle, tiny_image):
    pipe = Pipeline(Bundle.open(tiny_bundle))
    calls = Counting(pipe)
    conv = Conversation(pipe, preprocess_file(tiny_image, pipe.preprocess), PruneConfig(heavy_budget=8, recent_budget=6))
    turns = []
    for q in QUESTIONS:
        before = len(calls.fed)
        new_ids = conv.next_turn_ids(q) if conv.cache is not None else None
        turns.append(conv.ask(q, max_new_tokens=12))
        prefill = calls.fed[before]
        assert prefill == turns[-1].fed_tokens
        if new_ids is not None:  # only this turn's tokens go in: the previous answer's last token, </s>, USER: q ASSISTANT:
            assert prefill == len(new_ids) < turns[0].fed_tokens
        assert all(n == 1 for n in calls.fed[before + 1 :])  # then one token per decode step
    assert calls.vision_calls == 1
    # Every position the conversation holds went through the decoder exactly once (the image as its k tokens).
    assert sum(calls.fed) == conv.position == len(conv.ids) - 1 + turns[0].visual_tokens_kept
    # Stage 2 holds the cache at the first turn's budget across turns, as during decoding.
    assert all(t.cache_tokens == 14 for t in turns)


def test_a_cached_turn_equals_a_full_prefill_of_the_conversation_when_nothing_is_evicted(tiny_bundle, tmp_path):
    """With Stage 2 off the cache is exact, so turn N on the cache must equal one `generate` over the whole
    conversation's tokens (what a server without cache reuse would run)."""
    pipe = Pipeline(Bundle.open(tiny_bundle))
    prune = PruneConfig(text=False)
    for seed in range(3):
        pixels = preprocess_file(save_tiny_image(tmp_path / f"{seed}.png", seed=seed), pipe.preprocess)
        conv = Conversation(pipe, pixels, prune)
        conv.ask(QUESTIONS[0], max_new_tokens=6)
        for q in QUESTIONS[1:]:
            ids = conv.ids + conv.next_turn_ids(q)
            prompt = Prompt(text="", input_ids=np.array(ids, np.int64), image_index=ids.index(pipe.tokenizer.image_token_id))
            full = pipe.generate(prompt, pixels, prune, max_new_tokens=6)
            turn = conv.ask(q, max_new_tokens=6)
            assert turn.token_ids == full.token_ids, (seed, q)
            assert turn.cache_tokens == full.cache_tokens


def test_turns_follow_transformers_chat_template_token_for_token(embedded_bundle, tmp_path):
    """The embedded model's own template, rendered by transformers: same text, and the ids the cache holds are the
    ids `processor(text=...)` gives for that text (BOS from the tokenizer, as LLaVA's processor adds it)."""
    from transformers import AutoTokenizer

    from vtprune.models.loading import default_model_dir

    reference = AutoTokenizer.from_pretrained(default_model_dir())
    pipe = Pipeline(Bundle.open(embedded_bundle))
    conv = Conversation(pipe, preprocess_file(save_tiny_image(tmp_path / "a.png"), pipe.preprocess))
    questions = ["Is there a red circle in the image?", "How many objects are there?", "What colour is the square?"]
    for i, q in enumerate(questions):
        messages = conv.messages + [{"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]}]
        text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert conv.template.render(messages, add_generation_prompt=True) == text
        ids = reference(text).input_ids
        if i == 0:
            assert pipe.tokenizer.build(q, pipe.template).input_ids.tolist() == ids  # = `vtprune run`'s prompt
        else:
            assert conv.ids + conv.next_turn_ids(q) == ids
        conv.ask(q, max_new_tokens=16)
    history = reference.apply_chat_template(conv.messages, tokenize=False)
    assert conv.template.render(conv.messages, add_generation_prompt=False) == history
    assert history.count("</s>") == 3 and history.count("<image>") == 1


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(tiny_bundle, tiny_image, monkeypatch, capsys):
    """A real SIGINT, delivered during the first answer's fourth decoder call: that answer ends there, the next turn runs."""
    calls = {"n": 0}
    step = Pipeline.step

    def step_then_interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a, **k)

    monkeypatch.setattr(Pipeline, "step", step_then_interrupt)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a shell's background job
    out, _ = _chat(monkeypatch, capsys, tiny_bundle, tiny_image, [QUESTIONS[0], QUESTIONS[1]], "--max-new-tokens", "40")
    answers = [e for e in out["events"] if e["kind"] == "answer"]
    assert answers[0]["finish_reason"] == "interrupted" and len(answers[0]["token_ids"]) == 4
    assert answers[1]["finish_reason"] in ("length", "stop") and answers[1]["fed_tokens"] < answers[0]["fed_tokens"]
    assert signal.getsignal(signal.SIGINT) is before  # restored once the answer ended


def test_a_turn_past_the_context_is_one_error_and_reset_recovers(tiny_bundle, tiny_image, monkeypatch, capsys):
    out, err = _chat(monkeypatch, capsys, tiny_bundle, tiny_image,
                     [QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[1]], "--max-new-tokens", "485", "--no-text-prune")
    kinds = [e["kind"] for e in out["events"]]
    assert kinds == ["image", "answer", "error", "reset", "answer"]
    assert out["events"][2]["where"] == "conversation" and "context" in out["events"][2]["message"]
    assert len([line for line in err.splitlines() if line.startswith("vtprune: error:")]) == 1


@pytest.mark.parametrize("argv, where", [
    (["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    (["--image", "/nonexistent.png"], "/nonexistent.png"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_chat_arguments_exit_2_with_one_line(tiny_bundle, tiny_image, argv, where, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is red ?\n"))
    base = {"--bundle": str(tiny_bundle), "--image": str(tiny_image)}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["chat", *[x for kv in base.items() for x in kv], "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith(f"vtprune: error: {where}: ")


def test_independent_turns_each_answer_as_run_on_one_vision_pass_and_one_prefix(tiny_bundle, tmp_path, capsys):
    """--turns independent: every question sees only the image (the embedded model's training), so every turn is a
    `vtprune run`; the image is encoded once and its prefix prefilled once, each turn prefills its question only."""
    from vtprune.runtime.chat import IndependentTurns

    image = save_tiny_image(tmp_path / "a.png", seed=4)
    pipe = Pipeline(Bundle.open(tiny_bundle))
    calls = Counting(pipe)
    chat = IndependentTurns(pipe, preprocess_file(image, pipe.preprocess))
    for n, q in enumerate(QUESTIONS * 2):
        before = len(calls.fed)
        turn = chat.ask(q, max_new_tokens=8, temperature=0.8, seed=n)
        expected = _run_tokens(capsys, tiny_bundle, image, q, "--max-new-tokens", "8", "--temperature", "0.8", "--seed", str(n))
        assert turn.token_ids == expected["token_ids"], q
        assert turn.prompt_tokens == expected["prompt_tokens"] and turn.cache_tokens == expected["cache_tokens"]
        question_tokens = len(expected["input_ids"]) - 1 - expected["input_ids"].index(pipe.tokenizer.image_token_id)
        fed = calls.fed[before:]
        if n == 0:  # the image prefix (BOS, USER, :, the k image tokens), then the question
            assert fed[0] == len(expected["input_ids"]) - question_tokens - 1 + expected["visual_tokens_kept"]
            fed = fed[1:]
        assert fed[0] == turn.fed_tokens == question_tokens and all(s == 1 for s in fed[1:])
    assert calls.vision_calls == 1
