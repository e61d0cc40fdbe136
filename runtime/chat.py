"""A conversation about one image on a bundle: the image is encoded once, each turn appends to the KV cache.

Turns are rendered with the tokenizer's own chat template (`tokenizer_config.json`'s `chat_template`), in a Jinja
sandbox set up as `transformers` sets up its own (`apply_chat_template`), so the text equals transformers' for the
same messages (a test checks it). A turn feeds only what the template adds after the previous answer, the way
llama.cpp's `common_chat_format_single` does it:

    turn 1: <s>USER: <image>\\n{q1} ASSISTANT:                  (prefill from position 0; the vision pass)
    turn 2: </s>USER: {q2} ASSISTANT:                          (prefill from where turn 1 stopped)

The answer's tokens stay in the cache as the model produced them; the answer's closing (the template's `</s>`)
is fed at the start of the next turn. Stage 2 keeps the cache at the first turn's budget across turns, exactly as
during decoding: a later turn's tokens enter the cache and KVEvict drops the lowest-scored older positions.
The cache itself is opaque here: only `Pipeline.prefill` and `Pipeline.decode` touch it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig
from vtprune.models.prompt import Prompt
from vtprune.runtime.generate import Pipeline, cache_length

# LLaVA-1.5's format, as the embedded model's tokenizer_config.json carries it; used when a bundle has no template.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
_SENTINEL = "\x00vtprune-answer\x00"


class ChatTemplate:
    """A chat template compiled like transformers' `_compile_jinja_template` (sandbox, trim/lstrip blocks,
    loopcontrols, `raise_exception`, `tojson`, and the `{% generation %}` tag that llava-hf's templates use)."""

    def __init__(self, source: str | None, special_tokens: dict[str, str | None]):
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):  # transformers' AssistantTracker, without the mask bookkeeping
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message):
            raise UserError("chat template", str(message))

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: __import__("json").dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.source = source or DEFAULT_CHAT_TEMPLATE
        try:
            self.template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise UserError("tokenizer_config.json", f"chat_template is not valid Jinja: {e}") from None
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise UserError("chat template", f"cannot render the conversation: {e}") from None


def user_message(text: str, with_image: bool) -> dict:
    """A user message in transformers' multimodal form ({"type": "image"} where the image goes)."""
    return {"role": "user", "content": ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@dataclass
class Turn:
    """One answer and how it was made. `fed_tokens` is how many positions this turn prefilled (the whole prompt with
    its k visual tokens on turn 1, only the new turn's tokens after that)."""

    question: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens), "interrupted" (Ctrl-C, closed connection)
    fed_tokens: int
    prompt_tokens: int  # of fed_tokens, how many Stage 2 kept at prefill
    visual_tokens_kept: int
    visual_tokens_total: int
    cache_tokens: int
    vision_ms: float  # 0 after the first turn: the image is encoded once
    prefill_ms: float
    decode_ms: float
    kept_index: list[int] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        return self.vision_ms + self.prefill_ms

    @property
    def ms_per_token(self) -> float:
        steps = len(self.token_ids) - 1
        return self.decode_ms / steps if steps > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "question": self.question, "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "fed_tokens": self.fed_tokens, "prompt_tokens": self.prompt_tokens,
            "visual_tokens_kept": self.visual_tokens_kept, "visual_tokens_total": self.visual_tokens_total,
            "cache_tokens": self.cache_tokens, "vision_ms": round(self.vision_ms, 3), "prefill_ms": round(self.prefill_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3), "decode_ms": round(self.decode_ms, 3), "ms_per_token": round(self.ms_per_token, 3),
            "kept_index": self.kept_index,
        }


class Conversation:
    """The state of one chat about one image: messages, the token ids the cache holds, the cache, the position.

    `ask` appends a turn; `reset` forgets the turns but keeps the encoded image."""

    def __init__(self, pipe: Pipeline, pixel_values: np.ndarray, prune: PruneConfig | None = None,
                 template: ChatTemplate | None = None):
        self.pipe = pipe
        self.prune = prune or pipe.prune
        self.pixel_values = pixel_values
        tok = pipe.tokenizer
        self.template = template or ChatTemplate(tok.chat_template, {
            "bos_token": _token(tok, tok.bos_token_id), "eos_token": _token(tok, tok.eos_token_id),
            "pad_token": _token(tok, tok.pad_token_id), "image_token": tok.image_token})
        self.image_embeds: np.ndarray | None = None  # [1, k, D], computed at the first turn, then kept
        self.kept_index: np.ndarray | None = None  # [1, k]
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.ids: list[int] = []  # every token id fed to the decoder so far, in order (the image as its one token)
        self.last_answer: list[int] = []  # the latest answer's tokens; its last one is not in the cache yet
        self.cache: dict | None = None
        self.position = 0  # the next position id (original, unpruned numbering)
        self.budget: tuple[int, int] | None = None
        self.image_span = (0, 0)  # position ids [first, end) of the image tokens (graphs of policy vfloor read it)

    @property
    def cache_tokens(self) -> int:
        return cache_length(self.cache) if self.cache is not None else 0

    # ------------------------------------------------------------------ the next turn's tokens
    def _encode_plain(self, text: str) -> list[int]:
        return self.pipe.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids

    def next_turn_ids(self, question: str) -> list[int]:
        """The token ids a new user turn adds after the cache: the previous answer's last token (unless it is an
        EOS the template does not keep), the answer's closing, and the new user message with the generation prompt."""
        past = self.template.render(self.messages, add_generation_prompt=False)
        new = self.template.render(self.messages + [user_message(question, with_image=False)], add_generation_prompt=True)
        if not new.startswith(past):
            raise UserError("chat template", "it re-renders earlier turns differently when a turn is added; "
                                             "a cached conversation needs an append-only template")
        with_sentinel = self.template.render(self.messages[:-1] + [assistant_message(_SENTINEL)], add_generation_prompt=False)
        closing = with_sentinel.split(_SENTINEL, 1)[1] if _SENTINEL in with_sentinel else ""
        eos = self.pipe.tokenizer.eos_token_id
        tail = self.last_answer[-1:] if self.last_answer and self.last_answer[-1] != eos else []
        return tail + self._encode_plain(closing) + self._encode_plain(new[len(past):])

    # ------------------------------------------------------------------ one turn
    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            on_token: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Turn:
        pipe, tok = self.pipe, self.pipe.tokenizer
        if not question.strip():
            raise UserError("question", "expected a question, got an empty line")
        n = pipe.model["num_patches"]
        vision_ms = 0.0
        t0 = time.perf_counter()
        if self.image_embeds is None:
            self.image_embeds, self.kept_index = pipe.encode_image(self.pixel_values, k_min=self.prune.k_min if self.prune.visual else n)
            vision_ms = (time.perf_counter() - t0) * 1000
        first = self.cache is None
        if first:
            text = self.template.render([user_message(question, with_image=True)], add_generation_prompt=True)
            prompt = tok.encode(text)  # BOS from tokenizer.json's post-processor, as `vtprune run`
            new_ids = prompt.input_ids.tolist()
            embeds = pipe.splice(prompt, self.image_embeds)  # [1, L, D]
            self.budget = pipe.budget(embeds.shape[1], self.prune)
            self.image_span = (prompt.image_index, prompt.image_index + int(self.image_embeds.shape[1]))
            cache = pipe.empty_cache(capacity=pipe.cache_capacity(self.budget, pipe.model["context_length"]))
        else:
            new_ids = self.next_turn_ids(question)
            if tok.image_token_id in new_ids:
                raise UserError("question", f"expected no {tok.image_token} after the first turn: use /image PATH for a new image")
            embeds = pipe.embed_tokens[new_ids][None]  # [1, S, D]
            cache = self.cache
        context = pipe.model["context_length"]
        needed = self.position + embeds.shape[1] + max_new_tokens
        if needed > context:
            raise UserError("conversation", f"this turn would reach position {needed}, past the model's context of {context} "
                                            "(positions count every token of the conversation, evicted or not): /reset to start again")
        t1 = time.perf_counter()
        logits, kept_positions, cache = pipe.prefill(embeds, self.position, cache, self.budget, self.image_span)
        t2 = time.perf_counter()
        position = self.position + embeds.shape[1]
        tokens, _, cache = pipe.decode(logits, cache, position, self.budget, max_new_tokens, temperature, top_p,
                                       np.random.default_rng(seed), on_token, True, should_stop, self.image_span)
        t3 = time.perf_counter()
        # Commit the turn: what the decoder has seen, the messages, and where the next turn starts.
        self.cache = cache
        self.ids += new_ids + tokens[:-1]
        self.position = position + len(tokens) - 1
        self.last_answer = tokens
        answer = tok.decode(tokens)
        if first:
            self.messages.append(user_message(question, with_image=True))
        else:
            self.messages.append(user_message(question, with_image=False))
        self.messages.append(assistant_message(answer))
        interrupted = should_stop is not None and should_stop()
        finish = "stop" if tokens and tokens[-1] == tok.eos_token_id else ("interrupted" if interrupted else "length")
        return Turn(
            question=question, token_ids=tokens, text=answer, finish_reason=finish, fed_tokens=int(embeds.shape[1]),
            prompt_tokens=int(kept_positions.shape[1]), visual_tokens_kept=int(self.kept_index.shape[1]),
            visual_tokens_total=n, cache_tokens=cache_length(cache), vision_ms=vision_ms,
            prefill_ms=(t2 - t1) * 1000 + (t1 - t0) * 1000 - vision_ms, decode_ms=(t3 - t2) * 1000,
            kept_index=self.kept_index[0].tolist(),
        )

    def pending_ids(self) -> list[int]:
        """The conversation's full token sequence so far (the cache's ids plus the last, unfed answer token)."""
        return self.ids + self.last_answer[-1:]



class IndependentTurns:
    """Questions about one image, each seeing the image and itself only (how the embedded model was trained), with
    the image prefix `<s>USER: <image>` prefilled once and its cache forked for every question.

    Each turn prefills only its question (`\n{q} ASSISTANT:`) at the positions a single-turn prompt has, with that
    prompt's Stage 2 budget, so it answers as `vtprune run` does wherever Stage 2 drops nothing at prefill (the
    paper's 0.5 / 0.5 ratios; absolute budgets below the prompt length select among the question's tokens only)."""

    def __init__(self, pipe: Pipeline, pixel_values: np.ndarray, prune: PruneConfig | None = None,
                 template: ChatTemplate | None = None):
        self.inner = Conversation(pipe, pixel_values, prune, template)  # the template, the encoded image
        self.pipe, self.prune = pipe, self.inner.prune
        self.prefix: tuple[list[int], dict, int] | None = None  # (ids up to the image token, its cache, its length)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.cache: dict | None = None
        self.position = 0
        self.budget: tuple[int, int] | None = None

    @property
    def cache_tokens(self) -> int:
        return cache_length(self.cache) if self.cache is not None else 0

    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            on_token: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Turn:
        pipe, tok, inner = self.pipe, self.pipe.tokenizer, self.inner
        if not question.strip():
            raise UserError("question", "expected a question, got an empty line")
        n = pipe.model["num_patches"]
        t0 = time.perf_counter()
        vision_ms = 0.0
        if inner.image_embeds is None:
            inner.image_embeds, inner.kept_index = pipe.encode_image(inner.pixel_values, k_min=self.prune.k_min if self.prune.visual else n)
            vision_ms = (time.perf_counter() - t0) * 1000
        prompt = tok.encode(inner.template.render([user_message(question, with_image=True)], add_generation_prompt=True))
        ids, i = prompt.input_ids.tolist(), prompt.image_index
        k = int(inner.image_embeds.shape[1])
        span = (i, i + k)
        if self.prefix is None:  # the image prefix, once: no Stage 2 budget can drop a token of it here
            head = Prompt(text="", input_ids=prompt.input_ids[: i + 1], image_index=i)
            embeds = pipe.splice(head, inner.image_embeds)  # [1, i + k, D]
            _, _, cache = pipe.prefill(embeds, 0, pipe.empty_cache(capacity=embeds.shape[1]), (pipe.model["context_length"] + 1, 0), span)
            self.prefix = (ids[: i + 1], cache, i + k)
        head_ids, head_cache, start = self.prefix
        if ids[: i + 1] != head_ids:
            raise UserError("chat template", "the image prefix tokenizes differently for this question; use --turns conversation")
        L = len(ids) - 1 + k
        if L + max_new_tokens > pipe.model["context_length"]:
            raise UserError("question", f"the prompt is {L} tokens with the image; the model's context is "
                                        f"{pipe.model['context_length']} (at most {pipe.model['context_length'] - L} new tokens)")
        self.budget = pipe.budget(L, self.prune)
        embeds = pipe.embed_tokens[ids[i + 1 :]][None]  # [1, S, D]: the question and the generation prompt
        t1 = time.perf_counter()
        cache = pipe.fork_cache(head_cache, pipe.cache_capacity(self.budget, L + max_new_tokens))
        logits, kept_positions, cache = pipe.prefill(embeds, start, cache, self.budget, span)
        t2 = time.perf_counter()
        tokens, _, cache = pipe.decode(logits, cache, L, self.budget, max_new_tokens, temperature, top_p,
                                       np.random.default_rng(seed), on_token, True, should_stop, span)
        t3 = time.perf_counter()
        self.cache, self.position = cache, L + len(tokens) - 1
        answer = tok.decode(tokens)
        self.messages = [user_message(question, with_image=True), assistant_message(answer)]
        interrupted = should_stop is not None and should_stop()
        finish = "stop" if tokens and tokens[-1] == tok.eos_token_id else ("interrupted" if interrupted else "length")
        return Turn(
            question=question, token_ids=tokens, text=answer, finish_reason=finish, fed_tokens=int(embeds.shape[1]),
            prompt_tokens=start + int(kept_positions.shape[1]), visual_tokens_kept=k, visual_tokens_total=n,
            cache_tokens=cache_length(cache), vision_ms=vision_ms, prefill_ms=(t2 - t0) * 1000 - vision_ms,
            decode_ms=(t3 - t2) * 1000, kept_index=inner.kept_index[0].tolist(),
        )


def _token(tok, token_id: int | None) -> str | None:
    return tok.tokenizer.id_to_token(token_id) if token_id is not None else None
