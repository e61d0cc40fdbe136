"""The embedded model's tokenizer and preprocessor: closed vocabulary, LLaVA-1.5 template, transformers loads them."""

import numpy as np
import pytest
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast

from vtprune.models.embedded import data
from vtprune.models.embedded import tokenizer as T


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    T.save(out)
    return out


def _texts():
    rng = np.random.default_rng(0)
    for i in range(40):
        for qa in data.conversation(data.make_scene("train", 0, i), rng, 8):
            yield qa.question
            yield qa.answer


def test_round_trip_without_unknown_words():
    tok = T.build()
    for text in _texts():
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_answers_to_short_questions_are_one_token():
    tok = T.build()
    for word in ["yes", "no", "left", "above", "0", "5", *data.COLOURS]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1


def test_image_is_one_token_and_bos_is_added():
    tok = T.build()
    ids = tok("<image>").input_ids
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    five = tok("USER: " + "<image>" * 5 + "\nHow many circles are there? ASSISTANT:").input_ids
    assert five.count(tok.convert_tokens_to_ids("<image>")) == 5


def test_chat_template_is_llava_15(saved):
    tok = AutoTokenizer.from_pretrained(saved)
    q = "Is there a red circle in the image?"
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True) == T.PROMPT.format(question=q)
    two = one + [{"role": "assistant", "content": "yes"}, {"role": "user", "content": "How many circles are there?"}]
    assert tok.apply_chat_template(two, tokenize=False, add_generation_prompt=True) == (
        "USER: <image>\nIs there a red circle in the image? ASSISTANT: yes</s>USER: How many circles are there? ASSISTANT:"
    )


def test_loads_with_transformers(saved):
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        tok = cls.from_pretrained(saved)
        assert tok.convert_ids_to_tokens(T.build()("Describe the image.").input_ids) == [
            "<s>", "Describe", "the", "image", "."]  # fmt: skip
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    proc = AutoImageProcessor.from_pretrained(saved)
    assert proc.crop_size == {"height": 336, "width": 336}
    assert list(proc.image_mean) == T.CLIP_MEAN and list(proc.image_std) == T.CLIP_STD
