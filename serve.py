"""`vtprune serve`: an OpenAI-compatible chat-completions server on a bundle (FastAPI + uvicorn; no torch).

Over 400 lines on purpose: the OpenAI request schema, the queue, SSE streaming and the error mapping are one API, read in one file.

    POST /v1/chat/completions   messages with `image_url` parts as data: URLs; max_tokens (or max_completion_tokens),
                                temperature, top_p, seed, stop, stream (server-sent events, `data: [DONE]` last)
    GET  /v1/models             the one model this server holds
    GET  /health                {"status": "ok", ...} once the model is loaded

One model in memory, one worker thread that runs the requests one at a time in arrival order (a batch would have
to keep each image's own k, and a CPU gains little from it); requests beyond `--queue-size` waiting answer 503.
Every bad request answers 400 with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` and the
server goes on. Answers carry `usage` (prompt tokens with the image's kept visual tokens) and vtprune's own figures
in an extra `vtprune` field (the openai client keeps unknown fields: `completion.model_extra["vtprune"]`).
A streamed answer sends one chunk per generated token, each with its id in `vtprune.token_ids`.
"""


import asyncio
import base64
import binascii
import json
import queue
import re
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vtprune.errors import UserError

MAX_BODY_BYTES = 32 * 1024 * 1024  # a 336 px image is ~0.3 MB of base64; a 20 MP JPEG fits
DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)


class BadRequest(Exception):
    """A 400: the message is one line; `param` names the request field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------- the request
def _request_models():
    """The request schema as pydantic models (strict: "5" is not an integer); unknown fields are ignored, as
    llama-server and Ollama ignore them."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)

    class ImageURL(Strict):
        url: str
        detail: str | None = None

    class Part(Strict):
        type: Literal["text", "image_url"]
        text: str | None = None
        image_url: ImageURL | None = None

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[Part] | None = None

    class StreamOptions(Strict):
        include_usage: bool = False

    class ChatRequest(Strict):
        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, gt=0, le=1)
        seed: int | None = Field(default=None, ge=0)
        n: int | None = Field(default=None, ge=1, le=1)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None

    return ChatRequest


@dataclass
class Job:
    """One request on its way through the worker: what to run, and the queue its events go back on."""

    prompt: object  # a vtprune Prompt (ids with one image token)
    pixels: np.ndarray  # [1, 3, H, W]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    """The model and its one worker thread; `submit` refuses with 503 when `queue_size` jobs are already waiting."""

    def __init__(self, pipe, prune, defaults: dict, queue_size: int):
        self.pipe, self.prune, self.defaults, self.queue_size = pipe, prune, defaults, queue_size
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting = 0
        self.lock = threading.Lock()
        self.served = 0
        self.busy = False
        threading.Thread(target=self._work, name="vtprune-worker", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.queue_size:
                raise BadRequest(f"the server is busy: {self.waiting} requests are waiting (--queue-size {self.queue_size}); "
                                 "retry later", status=503, kind="server_error")
            self.waiting += 1
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            with self.lock:
                self.waiting -= 1
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._run(job)
            except BadRequest as e:
                job.emit("error", e)
            except UserError as e:
                job.emit("error", BadRequest(f"{e.where}: {e.what}"))
            except Exception as e:  # a bug must not take the worker down with it: answer 500, keep serving
                job.emit("error", BadRequest(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error"))
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> None:
        """The steps of `Pipeline.generate`, with the context check once k is known and a stop on a closed connection."""
        pipe, prune = self.pipe, self.prune
        t0 = time.perf_counter()
        n = pipe.model["num_patches"]
        image_embeds, kept = pipe.encode_image(job.pixels, k_min=prune.k_min if prune.visual else n)
        t1 = time.perf_counter()
        embeds = pipe.splice(job.prompt, image_embeds)  # [1, L, D]
        L = embeds.shape[1]
        context = pipe.model["context_length"]
        room = context - L
        if room < 1:
            raise BadRequest(f"the prompt is {L} tokens with the image's {kept.shape[1]} visual tokens; the model's context "
                             f"is {context}", param="messages")
        if job.max_tokens is not None and job.max_tokens > room:
            raise BadRequest(f"max_tokens is {job.max_tokens}, but the prompt is {L} tokens with the image and the model's "
                             f"context is {context}: at most {room}", param="max_tokens")
        max_tokens = job.max_tokens or min(self.defaults["max_tokens"], room)
        budget = pipe.budget(L, prune)
        span = (job.prompt.image_index, job.prompt.image_index + int(kept.shape[1]))  # the image's positions
        cache = pipe.empty_cache(capacity=pipe.cache_capacity(budget, L + max_tokens))
        logits, kept_positions, cache = pipe.prefill(embeds, 0, cache, budget, span)
        t2 = time.perf_counter()
        decode = pipe.tokenizer.decode
        tokens: list[int] = []
        text = [""]
        stopped = [False]

        def on_token(token: int) -> None:
            tokens.append(token)
            full = decode(tokens)
            cut = _stop_at(full, job.stop)
            if cut is not None:
                full, stopped[0] = full[:cut], True
            delta = full[len(text[0]):] if full.startswith(text[0]) else ""
            if full.startswith(text[0]):
                text[0] = full
            job.emit("token", (token, delta))

        job.emit("started", {"queue_ms": (t0 - job.queued_at) * 1000})
        tokens_out, _, cache = pipe.decode(logits, cache, L, budget, max_tokens, job.temperature, job.top_p,
                                           np.random.default_rng(job.seed), on_token, True,
                                           lambda: stopped[0] or job.cancelled.is_set(), span)
        t3 = time.perf_counter()
        eos = pipe.tokenizer.eos_token_id
        finish = "stop" if (tokens_out and tokens_out[-1] == eos) or stopped[0] else "length"
        completion = len(tokens_out) - (1 if tokens_out and tokens_out[-1] == eos else 0)
        steps = max(len(tokens_out) - 1, 0)
        job.emit("done", {
            "text": text[0], "finish_reason": finish,
            "usage": {"prompt_tokens": L, "completion_tokens": completion, "total_tokens": L + completion},
            "vtprune": {
                "visual_tokens_kept": int(kept.shape[1]), "visual_tokens_total": n,
                "prompt_tokens_after_stage2": int(kept_positions.shape[1]), "cache_tokens": _cache_length(cache),
                "token_ids": tokens_out, "queue_ms": round((t0 - job.queued_at) * 1000, 3),
                "vision_ms": round((t1 - t0) * 1000, 3), "prefill_ms": round((t2 - t1) * 1000, 3),
                "ttft_ms": round((t2 - t0) * 1000, 3),
                "decode_tokens_per_s": round(steps / (t3 - t2), 3) if steps and t3 > t2 else 0.0,
            },
        })


def _cache_length(cache) -> int:
    from vtprune.runtime.generate import cache_length

    return cache_length(cache)


def _stop_at(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


# --------------------------------------------------------------------------------------------- parsing
def parse_request(body: bytes, pipe, template, defaults: dict):
    """Request bytes -> (validated request, Prompt, pixels); every problem is a BadRequest naming the field."""
    from pydantic import ValidationError

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"expected a JSON body: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"expected a JSON object, got {type(data).__name__}")
    try:
        req = _request_models().model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"])
        raise BadRequest(f"{param}: {err['msg']}", param=param) from None
    if req.messages[-1].role != "user":
        raise BadRequest("expected the last message to be the user's", param="messages")
    messages, image = [], None
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": role, "content": [{"type": "text", "text": m.content or ""}]})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "text":
                if part.text is None:
                    raise BadRequest(f"{where}.text: expected a string for a text part", param=f"{where}.text")
                parts.append({"type": "text", "text": part.text})
                continue
            if part.image_url is None:
                raise BadRequest(f"{where}.image_url: expected {{\"url\": \"data:image/...;base64,...\"}}", param=f"{where}.image_url")
            if image is not None:
                raise BadRequest(f"{where}: expected one image per conversation (LLaVA-1.5 takes one), got a second",
                                 param=where)
            if role != "user":
                raise BadRequest(f"{where}: expected the image in a user message", param=where)
            image = (f"{where}.image_url.url", part.image_url.url)
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    if image is None:
        raise BadRequest("expected an image: a user message needs an image_url part with a data: URL", param="messages")
    pixels = decode_image(*image, pipe.preprocess)
    text = template.render(messages, add_generation_prompt=True)
    try:
        prompt = pipe.tokenizer.encode(text)
    except UserError as e:
        raise BadRequest(f"messages: {e.what} (write the image as an image_url part, not as text)", param="messages") from None
    k_min = 1 if pipe.prune.visual else pipe.model["num_patches"]
    context = pipe.model["context_length"]
    if prompt.length_with_image(k_min) > context:
        raise BadRequest(f"the prompt is at least {prompt.length_with_image(k_min)} tokens with the image; the model's "
                         f"context is {context}", param="messages")
    return req, prompt, pixels


def decode_image(param: str, url: str, preprocess_config) -> np.ndarray:
    """A data: URL -> pixel_values [1, 3, H, W], through the same safe loader as `vtprune run` (bombs refused
    from the header before decoding). Remote URLs are refused: the server fetches nothing."""
    from vtprune.models.preprocess import load_image, preprocess

    if re.match(r"^(https?|ftp|file):", url, re.IGNORECASE):
        raise BadRequest(f"{param}: remote image URLs are not fetched; send the image inline as data:image/png;base64,...",
                         param=param)
    match = DATA_URL.match(url)
    if not match:
        raise BadRequest(f"{param}: expected a data:image/...;base64,... URL", param=param)
    try:
        raw = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{param}: the base64 data does not decode ({e})", param=param) from None
    if not raw:
        raise BadRequest(f"{param}: the image is empty", param=param)
    with tempfile.TemporaryDirectory(prefix="vtprune-serve-") as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(raw)
        try:
            return preprocess(load_image(path), preprocess_config, param)
        except UserError as e:
            raise BadRequest(f"{param}: {e.what}", param=param) from None


# --------------------------------------------------------------------------------------------- the app
def build_app(pipe, prune, model_name: str, defaults: dict, queue_size: int):
    """The FastAPI app around one Engine."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from vtprune.runtime.chat import ChatTemplate

    tok = pipe.tokenizer
    template = ChatTemplate(tok.chat_template, {
        "bos_token": _token(tok, tok.bos_token_id), "eos_token": _token(tok, tok.eos_token_id),
        "pad_token": _token(tok, tok.pad_token_id), "image_token": tok.image_token})
    engine = Engine(pipe, prune, defaults, queue_size)
    app = FastAPI(title="vtprune", version="0.1", docs_url=None, redoc_url=None)
    app.state.engine = engine
    created = int(time.time())

    def fail(e: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        code = "server_busy" if e.status == 503 else None
        return JSONResponse(error_body(e.message, e.kind, e.param, code), status_code=e.status, headers=headers)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", param=None), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}"), status_code=405)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": engine.waiting, "busy": engine.busy, "served": engine.served}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "vtprune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return fail(BadRequest(f"the request is {int(length):,} bytes; at most {MAX_BODY_BYTES:,}", status=413))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return fail(BadRequest(f"the request is over {MAX_BODY_BYTES:,} bytes", status=413))
        try:  # decoding the image is CPU work: off the event loop, so /health stays answered
            req, prompt, pixels = await asyncio.to_thread(parse_request, body, pipe, template, defaults)
            job = Job(prompt=prompt, pixels=pixels, max_tokens=req.max_tokens or req.max_completion_tokens,
                      temperature=defaults["temperature"] if req.temperature is None else req.temperature,
                      top_p=defaults["top_p"] if req.top_p is None else req.top_p,
                      seed=defaults["seed"] if req.seed is None else req.seed,
                      stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                      loop=asyncio.get_running_loop())
            engine.submit(job)
        except BadRequest as e:
            return fail(e)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            kind, payload = await job.events.get()  # "started", or the error that came before any token
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            return fail(payload)
        if not req.stream:
            try:
                while kind != "done":
                    kind, payload = await job.events.get()
                    if kind == "error":
                        return fail(payload)
            finally:
                if kind != "done":
                    job.cancelled.set()
            return {
                "id": cid, "object": "chat.completion", "created": now, "model": model_name, "system_fingerprint": "vtprune",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": payload["text"]},
                             "finish_reason": payload["finish_reason"], "logprobs": None}],
                "usage": payload["usage"], "vtprune": payload["vtprune"],
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "system_fingerprint": "vtprune", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await job.events.get()
                    if kind == "token":
                        token, delta = payload
                        yield chunk({"content": delta}, vtprune={"token_ids": [token]})
                    elif kind == "done":
                        yield chunk({}, payload["finish_reason"], vtprune=payload["vtprune"])
                        if include_usage:
                            usage = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                     "choices": [], "usage": payload["usage"]}
                            yield f"data: {json.dumps(usage)}\n\n"
                        break
                    elif kind == "error":  # after the headers went out: an error event, as OpenAI's stream does
                        yield f"data: {json.dumps(error_body(payload.message, payload.kind, payload.param))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a closed connection stops the generation at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _token(tok, token_id):
    return tok.tokenizer.id_to_token(token_id) if token_id is not None else None


# --------------------------------------------------------------------------------------------- the command
def main(args) -> dict | None:
    from vtprune.cli_run import check_generation_args
    from vtprune.models.config import prune_config_from_args
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    check_generation_args(args)
    if not (0 <= args.port <= 65535):
        raise UserError("--port", f"expected a port number 0-65535, got {args.port}")
    if args.queue_size < 1:
        raise UserError("--queue-size", f"expected an integer >= 1, got {args.queue_size}")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError("serve", f"needs the server packages ({e.name} is missing): pip install 'vtprune[serve]'") from None
    _check_port_free(args.host, args.port)
    bundle = Bundle.open(args.bundle)
    prune = prune_config_from_args(args)
    bundle.check_prune(prune)
    pipe = Pipeline(bundle, args.precision, args.provider, max(args.threads, 0))
    pipe.prune = prune
    name = args.model_name or Path(bundle.root).resolve().name
    defaults = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    app = build_app(pipe, prune, name, defaults, args.queue_size)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vtprune serve: binding {args.host}: reachable beyond this machine, with no authentication", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print(f"vtprune serve: {name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.run()
    except (OSError, SystemExit) as e:  # uvicorn exits when the port is taken or the address is not this machine's
        raise UserError("--port", f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or 'in use?'}") from None
    if not server.started:
        raise UserError("--port", f"cannot listen on {args.host}:{args.port} (in use?)")
    return {"model": name, "host": args.host, "port": args.port, "served": app.state.engine.served}


def _check_port_free(host: str, port: int) -> None:
    """Bind once before loading anything, so a taken port is one clear line (uvicorn would log and exit later)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError("--host", f"cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError("--port", f"cannot listen on {host}:{port}: {e.strerror}") from None
