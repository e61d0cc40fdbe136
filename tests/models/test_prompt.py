"""Runtime prompt: the LLaVA-1.5 template, its image token, and token ids read with `tokenizers` alone.

Tokenizers are built here: a WordLevel one whose ids can be worked out by hand, and a byte-level BPE like a real
LLaVA tokenizer, whose ids are checked against transformers' AutoTokenizer on the same files.
"""

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vtprune.errors import UserError
from vtprune.models.prompt import LLAVA_TEMPLATE, Prompt, PromptTokenizer, format_prompt

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "USER": 4, ":": 5, "ASSISTANT": 6, "what": 7, "colour": 8,
         "?": 9, "<pad>": 10, "is": 11, "it": 12}
CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True},
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "chat_template": "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}ASSISTANT:",
    "extra_special_tokens": {"image_token": "<image>"},
}


def word_level(bos: bool = True, image_added: bool = True) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<s>", "</s>", "<pad>", "<unk>"] + (["<image>"] if image_added else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def write(tmp_path, tokenizer: Tokenizer, config: dict | None = CONFIG):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path / "tokenizer.json", (tmp_path / "tokenizer_config.json" if config is not None else None)


@pytest.fixture
def wl(tmp_path) -> PromptTokenizer:
    return PromptTokenizer.from_files(*write(tmp_path, word_level()))


# ----------------------------------------------------------------------------------- the template


def test_question_gets_the_llava_template():
    assert format_prompt("what colour is it?") == "USER: <image>\nwhat colour is it? ASSISTANT:"


def test_image_token_in_the_question_stays_where_the_user_put_it():
    assert format_prompt("what colour is <image> ?") == "USER: what colour is <image> ? ASSISTANT:"
    assert format_prompt("<image>\nwhat colour?") == "USER: <image>\nwhat colour? ASSISTANT:"


def test_a_full_prompt_is_not_wrapped_twice():
    full = "USER: <image>\nwhat colour? ASSISTANT:"
    assert format_prompt(full) == full
    assert format_prompt("USER: what colour? ASSISTANT:") == full  # a full prompt without the image token gets one


def test_braces_in_the_question_are_text():
    assert format_prompt("what is {question} {0}?") == "USER: <image>\nwhat is {question} {0}? ASSISTANT:"


def test_template_without_image_token_gets_one_before_the_question():
    assert format_prompt("hi", template="Q: {question}\nA:") == "Q: <image>\nhi\nA:"


@pytest.mark.parametrize("question", ["<image> and <image>", "USER: <image>\n<image> what? ASSISTANT:", "<image><image><image>"])
def test_two_or_more_image_tokens_are_refused_naming_the_prompt_option(question):
    with pytest.raises(UserError) as e:
        format_prompt(question)
    assert e.value.where == "--prompt"
    assert f"found {question.count('<image>')}" in e.value.what


@pytest.mark.parametrize("question", ["", "   ", "<image>", "USER: ASSISTANT:"])
def test_empty_question_is_refused(question):
    with pytest.raises(UserError) as e:
        format_prompt(question)
    assert e.value.where == "--prompt" and "empty" in e.value.what


@pytest.mark.parametrize("template", ["USER: <image>\n ASSISTANT:", "{question} {question}", "<image> <image> {question}"])
def test_bad_templates_are_refused(template):
    with pytest.raises(UserError) as e:
        format_prompt("hi", template=template)
    assert e.value.where == "prompt template"


# ----------------------------------------------------------------------------------- token ids


def test_ids_by_hand(wl):
    prompt = wl.build("what colour is it?")
    # <s> USER : <image> what colour is it ? ASSISTANT :
    assert prompt.input_ids.tolist() == [1, 4, 5, 3, 7, 8, 11, 12, 9, 6, 5]
    assert prompt.input_ids.dtype == np.int64
    assert prompt.image_index == 3
    assert prompt.text == "USER: <image>\nwhat colour is it? ASSISTANT:"
    assert prompt.length_with_image(576) == 11 - 1 + 576


def test_special_token_ids_from_the_config(wl):
    assert (wl.bos_token_id, wl.eos_token_id, wl.pad_token_id, wl.image_token_id) == (1, 2, 10, 3)
    assert wl.image_token == "<image>"
    assert wl.chat_template == CONFIG["chat_template"]


def test_without_a_config_only_the_image_token_is_known(tmp_path):
    tok = PromptTokenizer.from_files(*write(tmp_path, word_level(), config=None))
    assert (tok.bos_token_id, tok.eos_token_id, tok.image_token_id, tok.chat_template) == (None, None, 3, None)
    assert tok.build("what?").input_ids.tolist() == [1, 4, 5, 3, 7, 9, 6, 5]  # BOS from the post-processor


def test_bos_follows_the_tokenizer_json_post_processor(tmp_path):
    tok = PromptTokenizer.from_files(*write(tmp_path, word_level(bos=False)))
    assert tok.build("what?").input_ids.tolist() == [4, 5, 3, 7, 9, 6, 5]


def test_encode_refuses_a_prompt_without_or_with_two_image_tokens(wl):
    for text, n in [("USER: what? ASSISTANT:", 0), ("USER: <image> <image> what? ASSISTANT:", 2)]:
        with pytest.raises(UserError) as e:
            wl.encode(text)
        assert e.value.where == "--prompt" and f"found {n}" in e.value.what


def test_decode_skips_special_tokens(wl):
    prompt = wl.build("what colour?")
    assert wl.decode(prompt.input_ids) == "USER : what colour ? ASSISTANT :"  # WordLevel joins tokens with spaces
    assert wl.decode([7, 2], skip_special_tokens=False) == "what </s>"


# ----------------------------------------------------------------------------------- bad files


def test_missing_or_malformed_tokenizer_json(tmp_path):
    with pytest.raises(UserError, match="no such file") as e:
        PromptTokenizer.from_files(tmp_path / "tokenizer.json")
    assert e.value.where == str(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(UserError, match="expected a `tokenizers` tokenizer.json"):
        PromptTokenizer.from_files(tmp_path / "tokenizer.json")


def test_missing_or_malformed_tokenizer_config(tmp_path):
    path, _ = write(tmp_path, word_level(), config=None)
    with pytest.raises(UserError, match="no such file"):
        PromptTokenizer.from_files(path, tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        PromptTokenizer.from_files(path, tmp_path / "tokenizer_config.json")


def test_image_token_missing_from_the_vocabulary(tmp_path):
    path, config = write(tmp_path, word_level())
    with pytest.raises(UserError, match="'<img>' in the vocabulary") as e:
        PromptTokenizer.from_files(path, config, image_token="<img>")
    assert e.value.where == str(path)


def test_image_token_that_text_would_split_is_refused(tmp_path):
    path, config = write(tmp_path, word_level(image_added=False))  # in the vocab, but not an added token
    with pytest.raises(UserError, match="split"):
        PromptTokenizer.from_files(path, config)


def test_special_token_missing_from_the_vocabulary_names_the_config(tmp_path):
    path, config = write(tmp_path, word_level(), config={**CONFIG, "eos_token": "<|end|>"})
    with pytest.raises(UserError, match="eos_token") as e:
        PromptTokenizer.from_files(path, config)
    assert e.value.where == str(config)


# ------------------------------------------------------------------------------ parity: transformers


def byte_level_bpe() -> Tokenizer:
    """A byte-level BPE with LLaVA's special tokens, trained on a few sentences (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["USER: what colour is the square? ASSISTANT: red", "is there a circle in the image? yes",
              "how many triangles are there? 3", "describe the picture. a small blue star left of a green disc"]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


QUESTIONS = ["what colour is the square?", "Is there a circle in the image? Answer yes or no.", "<image>\nhow many?",
             "describe  the picture\n in detail, é ü 日本", "USER: <image>\nwhat colour? ASSISTANT:"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_ids_match_transformers_autotokenizer(tmp_path, question):
    transformers = pytest.importorskip("transformers")
    path, config = write(tmp_path, byte_level_bpe())
    ours = PromptTokenizer.from_files(path, config)
    prompt = ours.build(question)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert prompt.input_ids.tolist() == reference(prompt.text)["input_ids"]
    assert prompt.input_ids[prompt.image_index] == reference.convert_tokens_to_ids("<image>") == ours.image_token_id
    assert prompt.input_ids[0] == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.decode(prompt.input_ids) == reference.decode(prompt.input_ids, skip_special_tokens=True)


def test_prompt_is_a_plain_value():
    prompt = Prompt(text="x", input_ids=np.array([1, 3], np.int64), image_index=1)
    assert prompt.length_with_image(5) == 6
    assert LLAVA_TEMPLATE == "USER: <image>\n{question} ASSISTANT:"


def test_the_embedded_models_tokenizer_files(tmp_path):
    """The files `vtprune.models.embedded.tokenizer` writes for the embedded model: same ids as transformers, BOS first."""
    embedded = pytest.importorskip("vtprune.models.embedded.tokenizer")
    transformers = pytest.importorskip("transformers")
    embedded.save(tmp_path)
    ours = PromptTokenizer.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for question in ["Is there a red circle in the image ?", "How many objects are there?"]:
        prompt = ours.build(question)
        assert prompt.input_ids.tolist() == reference(prompt.text)["input_ids"]
        assert prompt.input_ids[0] == ours.bos_token_id == reference.bos_token_id
        assert prompt.input_ids[prompt.image_index] == ours.image_token_id == reference.convert_tokens_to_ids("<image>")
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        assert prompt.text == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours.eos_token_id == reference.eos_token_id


# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json), as its processor renders it.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
EDGE_WHITESPACE = ["  what is red ?", "what is red ?\n", "\twhat is red ?", "what is red ?  ", " \n what is red ? \t",
                   "what\tis  red ?", "\n\nwhat is red ?", "what is red ?\r\n"]


@pytest.mark.parametrize("question", EDGE_WHITESPACE, ids=range(len(EDGE_WHITESPACE)))
def test_edge_whitespace_follows_the_chat_template_exactly(question, tmp_path):
    """A question with spaces, tabs or newlines at its edges becomes the prompt transformers' chat template renders,
    for llava-hf's template and the embedded model's (issue 20: vtprune used to strip them)."""
    transformers = pytest.importorskip("transformers")
    embedded = pytest.importorskip("vtprune.models.embedded.tokenizer")
    embedded.save(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    ours = format_prompt(question)
    assert ours == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    llava_hf = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False,
                                             chat_template=LLAVA_HF_CHAT_TEMPLATE)
    assert ours == llava_hf
