"""`vtprune serve` against the real `openai` client, on a server process listening on a free loopback port.

Answers equal `vtprune run`'s tokens (same image, prompt, seed), streamed or not, alone or 8 at a time; every bad
request is a 400 with an OpenAI-style body and the server keeps answering; a full queue is a 503."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from vtprune.cli import build_parser, main

from tiny_models import save_tiny_image

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vtprune.cli", "serve", "--bundle", str(bundle), "--port",
                                      str(self.port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[1]["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server did not answer /health within 120 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.status, json.loads(r.read())

    def post(self, body: bytes | dict):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    s = Server(tiny_bundle, "--queue-size", "8", "--max-new-tokens", "8")
    yield s
    s.close()


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def messages(image_url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def run_tokens(bundle, image, question, max_tokens, temperature=0.0, top_p=1.0, seed=0):
    """`vtprune run`'s answer, in this process (the reference the server must equal)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--bundle", str(bundle), "--image", str(image), "--prompt", question, "--json",
                     "--max-new-tokens", str(max_tokens), "--temperature", str(temperature), "--top-p", str(top_p),
                     "--seed", str(seed)]) == 0
    return json.loads(out.getvalue())


CASES = [  # image seed, question, max_tokens, temperature, top_p, seed
    (0, "what is red ?", 8, 0.0, 1.0, 0),
    (1, "what is in the image ?", 12, 0.9, 0.8, 5),
    (2, "is the circle blue ?", 6, 1.3, 1.0, 11),
]


@pytest.mark.parametrize("case", CASES)
def test_answers_equal_vtprune_run_streamed_and_not(server, tiny_bundle, tmp_path, case):
    image_seed, question, max_tokens, temperature, top_p, seed = case
    image = save_tiny_image(tmp_path / "i.png", seed=image_seed)
    expected = run_tokens(tiny_bundle, image, question, max_tokens, temperature, top_p, seed)
    kwargs = dict(model="anything", messages=messages(data_url(image), question), max_tokens=max_tokens,
                  temperature=temperature, top_p=top_p, seed=seed)
    done = server.client.chat.completions.create(**kwargs)
    extra = done.model_extra["vtprune"]
    assert extra["token_ids"] == expected["token_ids"]
    assert done.choices[0].message.content == expected["text"]
    assert done.choices[0].finish_reason == ("stop" if expected["token_ids"][-1] == 2 else "length")
    assert extra["visual_tokens_kept"] == expected["visual_tokens_kept"]
    assert extra["prompt_tokens_after_stage2"] == expected["prompt_tokens"]
    assert extra["cache_tokens"] == expected["cache_tokens"]
    assert done.usage.prompt_tokens == len(expected["input_ids"]) - 1 + expected["visual_tokens_kept"]
    assert done.usage.completion_tokens == len([t for t in expected["token_ids"] if t != 2])

    tokens, text, finish, usage = [], "", None, None
    for chunk in server.client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            finish = choice.finish_reason
        elif chunk.model_extra.get("vtprune"):
            tokens += chunk.model_extra["vtprune"]["token_ids"]
        text += choice.delta.content or ""
    assert tokens == expected["token_ids"] and text == expected["text"]
    assert finish == done.choices[0].finish_reason and usage.total_tokens == done.usage.total_tokens


def test_eight_concurrent_clients_all_get_their_own_answer(server, tiny_bundle, tmp_path):
    jobs = []
    for i in range(8):
        image = save_tiny_image(tmp_path / f"{i}.png", seed=10 + i)
        question = ["what is red ?", "what is in the image ?"][i % 2]
        jobs.append((image, question, 0.7 * (i % 3), 10 + i, run_tokens(tiny_bundle, image, question, 8, 0.7 * (i % 3), 1.0, 10 + i)))
    assert len({tuple(j[-1]["token_ids"]) for j in jobs}) > 4  # the answers differ, so a mix-up would show

    def ask(job):
        image, question, temperature, seed, _ = job
        r = server.client.chat.completions.create(model="m", messages=messages(data_url(image), question), max_tokens=8,
                                                  temperature=temperature, seed=seed)
        return r.model_extra["vtprune"]["token_ids"], r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for job, (tokens, text) in zip(jobs, answers):
        assert tokens == job[-1]["token_ids"] and text == job[-1]["text"]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels, with one short row of data (never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_every_bad_request_is_a_400_with_an_openai_error_and_the_server_keeps_answering(server, tiny_image):
    good = messages(data_url(tiny_image), "what is red ?")
    text_only = [{"role": "user", "content": "what is red ?"}]
    bomb = "data:image/png;base64," + base64.b64encode(png_declaring(100_000, 100_000)).decode()
    cases = {
        "no image": {"messages": text_only},
        "remote image": {"messages": messages("https://example.com/cat.png", "what is red ?")},
        "file image": {"messages": messages("file:///etc/passwd", "what is red ?")},
        "undecodable base64": {"messages": messages("data:image/png;base64,***not base64***", "what is red ?")},
        "not an image": {"messages": messages("data:image/png;base64," + base64.b64encode(b"hello").decode(), "what is red ?")},
        "bomb image": {"messages": messages(bomb, "what is red ?")},
        "two images": {"messages": [{"role": "user", "content": good[0]["content"] + good[0]["content"][:1]}]},
        "max_tokens a string": {"messages": good, "max_tokens": "8"},
        "temperature a string": {"messages": good, "temperature": "hot"},
        "stream a number": {"messages": good, "stream": 1},
        "seed negative": {"messages": good, "seed": -1},
        "top_p zero": {"messages": good, "top_p": 0},
        "messages not a list": {"messages": "hello"},
        "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
        "n = 2": {"messages": good, "n": 2},
        "prompt over the context": {"messages": messages(data_url(tiny_image), "red " * 600)},
        "max_tokens over the context": {"messages": good, "max_tokens": 600},
        "image token in text": {"messages": messages(data_url(tiny_image), "<image> what is red ?")},
    }
    for name, body in cases.items():
        status, _, reply = server.post(body)
        assert status == 400, (name, status, reply)
        error = reply["error"]
        assert error["type"] == "invalid_request_error" and "\n" not in error["message"] and error["message"], name
    for raw in (b"{not json", b"[1, 2]", b""):
        status, _, reply = server.post(raw)
        assert status == 400 and "JSON" in reply["error"]["message"], raw
    # Unknown fields are ignored (as llama-server and Ollama do), and the server still answers correctly.
    status, _, reply = server.post({"messages": good, "max_tokens": 4, "frequency_penalty": {"odd": "type"}, "user": 3})
    assert status == 200 and len(reply["vtprune"]["token_ids"]) <= 4
    assert server.get("/health")[1]["status"] == "ok"
    assert [m.id for m in server.client.models.list()] == [server.get("/v1/models")[1]["data"][0]["id"]]
    with pytest.raises(openai.BadRequestError) as e:  # what an openai user sees
        server.client.chat.completions.create(model="m", messages=text_only)
    assert "image" in e.value.body["message"]


def test_a_full_queue_answers_503_and_nothing_is_lost(tiny_bundle, tmp_path):
    image = save_tiny_image(tmp_path / "long.png", seed=3)
    expected = run_tokens(tiny_bundle, image, "what is red ?", 300)
    assert len(expected["token_ids"]) == 300  # a long answer, so requests pile up behind it
    s = Server(tiny_bundle, "--queue-size", "1")
    try:
        body = {"messages": messages(data_url(image), "what is red ?"), "max_tokens": 300}
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(s.post, body)
            deadline = time.monotonic() + 60  # the first answer running (off the queue) before the others arrive
            while not (s.get("/health")[1]["busy"] and s.get("/health")[1]["waiting"] == 0) and time.monotonic() < deadline:
                time.sleep(0.01)
            others = pool.map(lambda _: s.post(body), range(5))  # all five sent now, while the first runs
            replies = [first.result(), *others]
        busy = [r for r in replies if r[0] == 503]
        done = [r for r in replies if r[0] == 200]
        assert busy and len(done) >= 2 and len(busy) + len(done) == 6  # at least the running one and the queued one
        assert all(r[2]["vtprune"]["token_ids"] == expected["token_ids"] for r in done)
        assert all(r[2]["error"]["type"] == "server_error" and r[2]["error"]["code"] == "server_busy"
                   and r[1].get("Retry-After") == "1" for r in busy)
        assert s.post(body)[2]["vtprune"]["token_ids"] == expected["token_ids"]  # and it still serves afterwards
    finally:
        s.close()


def test_serve_binds_loopback_by_default_and_bad_arguments_are_one_line(tiny_bundle, capsys):
    assert build_parser().parse_args(["serve", "--bundle", "b"]).host == "127.0.0.1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, where in ((["--bundle", "/nonexistent"], "/nonexistent"),
                            (["--bundle", str(tiny_bundle), "--port", str(port)], "--port"),
                            (["--bundle", str(tiny_bundle), "--queue-size", "0"], "--queue-size")):
            assert main(["serve", *argv, "--port", str(free_port())] if "--port" not in argv else ["serve", *argv]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"vtprune: error: {where}: "), err


def test_the_server_runs_without_torch(tiny_bundle, tiny_image):
    """`vtprune serve` is runtime-only: with torch and transformers blocked at import, the app answers a request."""
    child = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
import base64, json
from starlette.testclient import TestClient
from vtprune.runtime.bundle import Bundle
from vtprune.runtime.generate import Pipeline
from vtprune.serve import build_app
pipe = Pipeline(Bundle.open({str(tiny_bundle)!r}))
app = build_app(pipe, pipe.prune, "tiny", {{"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}}, 2)
url = "data:image/png;base64," + base64.b64encode(open({str(tiny_image)!r}, "rb").read()).decode()
with TestClient(app) as client:
    r = client.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": [
        {{"type": "image_url", "image_url": {{"url": url}}}}, {{"type": "text", "text": "what is red ?"}}]}}]}})
assert r.status_code == 200, r.text
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
print("OK", len(r.json()["vtprune"]["token_ids"]))
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-2000:]
