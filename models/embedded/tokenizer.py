"""Tokenizer and image preprocessor of the embedded model, in the files llava-hf checkpoints carry.

Why word-level: the question set has a closed vocabulary of a few dozen words, so one word is one
token; answers are then single tokens (yes/no, digits, colours, directions), which keeps the small
language model's job as plain as possible. Built with `tokenizers` and saved as `tokenizer.json` +
`tokenizer_config.json` (LLaVA-1.5 chat template), with a CLIP `preprocessor_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vtprune.models.embedded import data

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]  # ids 0..4
IMAGE_TOKEN = "<image>"
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's template
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# LLaVA-1.5's format: "USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Every word the question set uses, in a fixed order (the ids do not depend on a data sample)."""
    words = ["USER", "ASSISTANT", ":", ".", ",", "?", "yes", "no", "left", "right", "above", "below"]
    words += [str(i) for i in range(10)]
    words += data.COLOUR_NAMES + data.SHAPES + list(data.PLURAL.values()) + list(data.SIZES)
    words += "Is there a in the image How many are objects What colour is Where relative to Describe".split()
    words += "There object A at top bottom centre".split()
    out: list[str] = []
    for w in words:
        if w not in out and w not in SPECIAL:
            out.append(w)
    return out


def card_section() -> str:
    """The model card's vocabulary section: the question forms it was trained on and every word it knows (any other
    word becomes <unk>; `vtprune run` names such words in a warning)."""
    forms = "\n".join(f"- `{f}`" for f in data.QUESTION_FORMS)
    slots = (f"`<colour>`: {', '.join(data.COLOUR_NAMES)}; `<shape>`: {', '.join(data.SHAPES)}; "
             f"`<shapes>`: {', '.join(data.PLURAL.values())}")
    words = " ".join(f"`{w}`" for w in vocabulary())
    return f"""## Vocabulary: the questions it understands

A closed, word-level vocabulary: one word is one token, and a word outside it becomes `<unk>` (`vtprune run` names
such words, and questions of another form, in a one-line warning). It was trained on these question forms only:

{forms}

with {slots}. Its {len(vocabulary())} words (besides {', '.join(f'`{t}`' for t in SPECIAL)}):

{words}
"""


def build() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation marks
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, no space before . , ?
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="left",
    )


def image_processor():
    """CLIP preprocessing at 336 px, as llava-hf/llava-1.5-7b-hf declares it."""
    from transformers import CLIPImageProcessor  # here: importing it notes torchvision's absence on stderr

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": data.IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def save(out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and preprocessor_config.json."""
    out_dir = Path(out_dir)
    build().save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    # transformers 5 keeps the template in chat_template.jinja; older loaders read it from here.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
