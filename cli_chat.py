"""`vtprune chat`: an interactive conversation about an image on a bundle (like llama.cpp's `llama-mtmd-cli`).

One line of standard input is one turn. Commands: `/image PATH` (a new image: a new cache), `/reset` (forget the
turns, keep the image), `/stats`, `/help`, `/exit` (or end of input). Ctrl-C stops the current answer, not the
session. With --json nothing is streamed; one JSON object with every event is printed at the end.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from vtprune.errors import UserError

HELP = "/image PATH  new image (new cache) · /reset  forget the turns · /stats · /exit  (Ctrl-C stops an answer)"


def main(args) -> dict | None:
    from vtprune.cli_run import check_generation_args, image_and_prompt
    from vtprune.models.config import prune_config_from_args
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    check_generation_args(args)
    bundle = Bundle.open(args.bundle)
    prune = prune_config_from_args(args)
    bundle.check_prune(prune)
    image = Path(args.image) if args.image else _sample_image(bundle)
    pipe = Pipeline(bundle, args.precision, args.provider, max(args.threads, 0))
    session = ChatSession(pipe, prune, args, stream=not args.json)
    session.open_image(image, fatal=True)
    session.loop(sys.stdin)
    return {"bundle": str(bundle.root), "precision": pipe.precision, "events": session.events} if args.json else None


def _sample_image(bundle) -> Path:
    sample = bundle.sample()  # confined to the bundle
    if sample is not None:
        return sample[0]
    raise UserError("--image", "expected the path of an image file (this bundle has no sample image)")


class ChatSession:
    """The command loop around a `Conversation`: reads lines, streams answers, keeps the events for --json."""

    def __init__(self, pipe, prune, args, stream: bool):
        self.pipe, self.prune, self.args, self.stream = pipe, prune, args, stream
        self.conversation = None
        self.image: Path | None = None
        self.events: list[dict] = []
        self.turns: list = []
        self.stop = threading.Event()

    def say(self, text: str, err: bool = False) -> None:
        if self.stream:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def error(self, e: UserError) -> None:
        self.events.append({"kind": "error", "where": e.where, "message": e.what})
        print(f"vtprune: error: {e.where}: {e.what}", file=sys.stderr, flush=True)

    def open_image(self, path: Path, fatal: bool = False) -> None:
        from vtprune.models.preprocess import preprocess_file
        from vtprune.runtime.chat import Conversation, IndependentTurns

        try:
            pixels = preprocess_file(path, self.pipe.preprocess)
        except UserError as e:
            if fatal:
                raise
            return self.error(e)
        kind = IndependentTurns if getattr(self.args, "turns", "conversation") == "independent" else Conversation
        self.conversation = kind(self.pipe, pixels, self.prune)
        self.image = path
        self.turns = []
        self.events.append({"kind": "image", "path": str(path)})
        self.say(f"image: {path}", err=True)

    def loop(self, stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            self.say(HELP, err=True)
        while True:
            try:
                if interactive:
                    sys.stdout.write(">>> ")
                    sys.stdout.flush()
                line = stdin.readline()
            except KeyboardInterrupt:  # at the prompt, as in Ollama: a hint, not an exit
                self.say("\n(use /exit or Ctrl-D to leave)", err=True)
                continue
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.ask(line)

    def command(self, line: str) -> bool:
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/image":
            if not rest.strip():
                self.error(UserError("/image", "expected the path of an image file: /image PATH"))
            else:
                self.open_image(Path(rest.strip()))
        elif name == "/reset":
            self.conversation.reset()
            self.turns = []
            self.events.append({"kind": "reset"})
            self.say("(conversation reset; same image)", err=True)
        elif name == "/stats":
            stats = self.stats()
            self.events.append({"kind": "stats", **stats})
            self.say(" · ".join(f"{k} {v}" for k, v in stats.items()))
        elif name == "/help":
            self.say(HELP)
        else:
            self.error(UserError(name, f"unknown command; expected one of /image PATH, /reset, /stats, /help, /exit"))
        return True

    def stats(self) -> dict:
        c = self.conversation
        last = self.turns[-1] if self.turns else None
        budget = c.budget
        return {
            "image": str(self.image),
            "turns": len(self.turns),
            "visual_tokens_kept": last.visual_tokens_kept if last else None,
            "visual_tokens_total": self.pipe.model["num_patches"],
            "cache_tokens": c.cache_tokens,
            "cache_budget": (budget[0] + budget[1]) if budget and self.prune.text else None,
            "position": c.position,
            "context_length": self.pipe.model["context_length"],
            "first_ttft_ms": round(self.turns[0].ttft_ms, 1) if self.turns else None,
            "last_ttft_ms": round(last.ttft_ms, 1) if last else None,
            "last_ms_per_token": round(last.ms_per_token, 2) if last else None,
        }

    def ask(self, question: str) -> None:
        from vtprune.cli_run import stream_printer

        args = self.args
        self.stop.clear()
        previous = signal.getsignal(signal.SIGINT)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:  # Ctrl-C during an answer ends the answer only
            signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        try:
            turn = self.conversation.ask(question, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                         on_token=stream_printer(self.pipe.tokenizer.decode, self.stream),
                                         should_stop=self.stop.is_set)
        except UserError as e:
            return self.error(e)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self.turns.append(turn)
        self.events.append({"kind": "answer", **turn.to_dict()})
        if self.stream:
            print(flush=True)
            note = " · interrupted" if turn.finish_reason == "interrupted" else ""
            print(f"[{turn.visual_tokens_kept}/{turn.visual_tokens_total} visual tokens · fed {turn.fed_tokens} · "
                  f"cache {turn.cache_tokens} · TTFT {turn.ttft_ms:.1f} ms · {turn.ms_per_token:.1f} ms/token{note}]",
                  file=sys.stderr, flush=True)
