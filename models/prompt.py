"""The LLaVA-1.5 prompt: a question -> `USER: <image>\\n{question} ASSISTANT:` -> token ids, with `tokenizers` only.

Why in models/: the prompt is the checkpoint's (its `tokenizer.json` and chat template); the model-folder loader
(`vtprune.models.loading.ModelFolder`) builds the PyTorch reference's prompts with it and the runtime builds a
bundle's, so both get the same ids from one place. It imports neither torch nor transformers, so the runtime
importing it still runs without torch (tests/runtime/test_torch_free.py and tests/test_layers.py check it).

Reads the folder's or bundle's `tokenizer.json` with `tokenizers` (not transformers) and the special tokens from its
`tokenizer_config.json`. The prompt template is the manifest's plain string with `{question}` substituted, not the
Jinja `chat_template` (kept here only so the runtime can report it). BOS and other special tokens come from the
`tokenizer.json` post-processor, which is also what transformers 5 follows for these files (a test checks that the
ids agree with `AutoTokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from vtprune.errors import UserError, read_json

LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt: the image's k embeddings replace the one token at `image_index`."""

    text: str
    input_ids: np.ndarray  # [S] int64
    image_index: int

    def length_with_image(self, k: int) -> int:
        """Sequence length once the image token is replaced by k visual tokens."""
        return len(self.input_ids) - 1 + k


@dataclass(frozen=True)
class PromptTokenizer:
    """A `tokenizers.Tokenizer` with the ids the runtime needs: image token, BOS, EOS, pad."""

    tokenizer: Tokenizer
    image_token: str
    image_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None

    @classmethod
    def from_files(
        cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None, image_token: str | None = None
    ) -> PromptTokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`); `image_token` defaults to the config's, else `<image>`."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise UserError(str(tokenizer_json), "no such file; expected a tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(str(tokenizer_json), f"expected a `tokenizers` tokenizer.json: {e}") from None

        config = _read_config(Path(tokenizer_config)) if tokenizer_config is not None else {}
        where_config = str(tokenizer_config) if tokenizer_config is not None else str(tokenizer_json)

        extra = config.get("extra_special_tokens")  # transformers 5 keeps model-specific tokens here
        extra_image = _token_text(extra.get("image_token")) if isinstance(extra, dict) else None
        image_token = image_token or _token_text(config.get("image_token")) or extra_image or IMAGE_TOKEN
        image_token_id = tokenizer.token_to_id(image_token)
        if image_token_id is None:
            raise UserError(str(tokenizer_json), f"expected the image token {image_token!r} in the vocabulary; it is missing")
        if tokenizer.encode(image_token, add_special_tokens=False).ids != [image_token_id]:
            raise UserError(
                str(tokenizer_json),
                f"expected the image token {image_token!r} to be an added token that text never splits; it is split",
            )

        def special_id(key: str) -> int | None:
            text = _token_text(config.get(key))
            if text is None:
                return None
            token_id = tokenizer.token_to_id(text)
            if token_id is None:
                raise UserError(where_config, f"`{key}` is {text!r}, which tokenizer.json's vocabulary does not contain")
            return token_id

        chat_template = config.get("chat_template")
        return cls(
            tokenizer=tokenizer,
            image_token=image_token,
            image_token_id=image_token_id,
            bos_token_id=special_id("bos_token"),
            eos_token_id=special_id("eos_token"),
            pad_token_id=special_id("pad_token"),
            chat_template=chat_template if isinstance(chat_template, str) else None,
        )

    def encode(self, text: str) -> Prompt:
        """Tokenize a full prompt that holds exactly one image token (special tokens per tokenizer.json)."""
        ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)  # [S]
        where = np.flatnonzero(ids == self.image_token_id)
        if len(where) != 1:
            raise UserError("--prompt", f"expected exactly one {self.image_token} token, found {len(where)}")
        return Prompt(text=text, input_ids=ids, image_index=int(where[0]))

    def build(self, question: str, template: str = LLAVA_TEMPLATE) -> Prompt:
        """A user's question (or a full LLaVA prompt) -> the tokenized prompt."""
        return self.encode(format_prompt(question, template, self.image_token))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def format_prompt(question: str, template: str = LLAVA_TEMPLATE, image_token: str = IMAGE_TOKEN) -> str:
    """Fill the template so the prompt holds exactly one image token.

    - no image token in the question: the template's goes first (`USER: <image>\\nWhat? ASSISTANT:`);
    - one in the question: it stays where the user put it and the template's is dropped;
    - two or more: a UserError naming `--prompt`.
    A question that is already a full prompt (`USER: ... ASSISTANT:`) is unwrapped first, so it is not wrapped twice.
    """
    if template.count("{question}") != 1:
        raise UserError("prompt template", f"expected exactly one {{question}} in {template!r}")
    if template.count(image_token) > 1:
        raise UserError("prompt template", f"expected at most one {image_token} in {template!r}")
    prefix, suffix = template.split("{question}")
    bare_prefix = prefix.replace(image_token + "\n", "").replace(image_token, "")

    # The question goes in verbatim, as transformers' chat template puts it (edge spaces, tabs and newlines kept);
    # only a question that is already a full prompt is unwrapped (and that one's edges do not count).
    stripped = question.strip()
    head, tail = bare_prefix.strip(), suffix.strip()
    if head and tail and stripped.startswith(head) and stripped.endswith(tail) and len(stripped) >= len(head) + len(tail):
        question = stripped[len(head) : len(stripped) - len(tail)].strip()
    n_image = question.count(image_token)
    if n_image >= 2:
        raise UserError("--prompt", f"expected at most one {image_token} token (where the image goes), found {n_image}")
    if not question.replace(image_token, "").strip():
        raise UserError("--prompt", "expected a question about the image, got an empty prompt")
    if n_image == 1:
        return bare_prefix + question + suffix
    if image_token in prefix:
        return prefix + question + suffix
    return prefix + image_token + "\n" + question + suffix


def _read_config(path: Path) -> dict:
    config = read_json(path, "a tokenizer_config.json", "tokenizer config")
    if not isinstance(config, dict):
        raise UserError(str(path), f"expected a JSON object, got {type(config).__name__}")
    return config


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None
