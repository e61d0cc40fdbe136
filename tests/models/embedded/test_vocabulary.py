"""The embedded model's closed vocabulary: every question the data set asks is one of the listed forms, the model
card lists the forms and the words, and `vtprune run` names unknown words (or an untrained question form) in one
warning line instead of answering <unk> silently."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vtprune import demo
from vtprune.models.embedded import data
from vtprune.models.embedded.tokenizer import card_section, vocabulary
from vtprune.models.loading import default_model_dir


def test_every_question_of_the_data_set_is_a_listed_form():
    questions = {data.make_sample(split, 0, i).question for split in ("train", "test") for i in range(400)}
    assert len(questions) > 50
    assert all(data.matches_a_question_form(q) for q in questions), [q for q in questions if not data.matches_a_question_form(q)]
    for q in ("What is in this picture?", "How many objects are there?", "Is there a red dog in the image?", "Describe it."):
        assert not data.matches_a_question_form(q), q
    words = set(vocabulary())
    assert all(w in words for q in questions for w in q.replace("?", " ?").replace(".", " .").split())


def test_the_model_card_lists_the_forms_and_the_words():
    card = (default_model_dir() / "README.md").read_text()
    assert card_section() in card
    assert all(f"`{f}`" in card for f in data.QUESTION_FORMS) and all(f"`{w}`" in card for w in vocabulary())


def run(prompt: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtprune.cli", "run", "--bundle", str(demo.SHIPPED_BUNDLE), "--image",
                           _image(), "--prompt", prompt, "--max-new-tokens", "2", "--json"],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _sample(tmp_path_factory):
    global _IMAGE
    _IMAGE = tmp_path_factory.mktemp("vocab") / "sample.png"
    demo.sample_item().image.save(_IMAGE)


def _image() -> str:
    return str(_IMAGE)


def test_unknown_words_are_named_with_the_trained_forms():
    p = run("What is in this picture?")
    assert p.returncode == 0, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("vtprune: warning: --prompt: the model does not know 'this', 'picture'")
    assert all(f in line for f in data.QUESTION_FORMS)


def test_a_question_of_another_form_is_named():
    p = run("How many objects are there?")  # known words, a form it never saw (it answers "0")
    assert p.returncode == 0, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "'How many objects are there?' is none of the questions the embedded model was trained on" in line


def test_a_trained_question_gives_no_warning():
    p = run(demo.sample_item().question)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
