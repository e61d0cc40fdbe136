"""A bounded load test of `vtprune serve` on loopback: a fixed number of chat-completion requests from a few
concurrent clients, every answer checked against the runtime's own tokens, requests/s, p50/p95 latency, and the
server's resident memory sampled along the way (flat = within 10% of its value after the warm-up).

Only 127.0.0.1 is ever contacted; the run stops after --requests requests or --max-seconds, whichever comes first.

    python -m vtprune.benchmarks.serve_load --out benchmarks/results [--bundle B] [--requests 500] [--clients 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FLAT_PCT = 10.0


def rss_mb(pid: int) -> float:
    """Resident memory of another process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(n: int, pipe, max_tokens: int):
    """n distinct (body, expected token ids) from the embedded test split; the expectation is the runtime's own answer."""
    from vtprune.models.embedded import data
    from vtprune.models.preprocess import preprocess

    out = []
    for i in range(n):
        s = data.make_sample("test", 0, i)
        buf = io.BytesIO()
        s.image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": "embedded", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": s.question}]}]}
        expected = pipe.generate(pipe.tokenizer.build(s.question, pipe.template), preprocess(s.image, pipe.preprocess),
                                 max_new_tokens=max_tokens).token_ids
        out.append((json.dumps(body).encode(), expected))
    return out


def post(url: str, body: bytes) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, reply = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, reply = e.code, json.loads(e.read())
    return status, reply, time.perf_counter() - t0


def chart(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    lat = [r["latency_ms"] for r in result["requests"]]
    a.hist(lat, bins=40, color="tab:blue")
    s = result["summary"]
    for q, style in (("p50", "--"), ("p95", ":")):
        a.axvline(s[f"latency_{q}_ms"], color="k", linestyle=style, label=f"{q} {s[f'latency_{q}_ms']:.0f} ms")
    a.set_xlabel("request latency, ms (loopback, whole answer)")
    a.set_ylabel("requests")
    a.legend(fontsize=8)
    a.set_title(f"{s['requests']} requests, {result['clients']} concurrent clients: {s['requests_per_s']:.2f} req/s", fontsize=9)
    xs, ys = zip(*result["rss_mb"])
    b.plot(xs, ys, marker=".", color="tab:red")
    base = s["rss_after_warmup_mb"]
    b.axhspan(base, base * (1 + FLAT_PCT / 100), color="tab:green", alpha=0.15, label=f"+{FLAT_PCT:.0f}% of the post-warm-up RSS")
    b.set_ylim(0, max(ys) * 1.3)
    b.set_xlabel("requests answered")
    b.set_ylabel("server RSS, MB")
    b.legend(fontsize=8, loc="lower right")
    m = result["machine"]
    b.set_title(f"server memory; {m['cores']}-core CPU, load {m['load_average_at_start'][0]} at start", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    from vtprune.benchmarks.bench import machine_info, write_json
    from vtprune.runtime.bundle import Bundle
    from vtprune.runtime.generate import Pipeline

    p = argparse.ArgumentParser(prog="python -m vtprune.benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="an exported bundle of the embedded model (default: export one now)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50, help="requests before the measured ones (twice --distinct: every input seen)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--distinct", type=int, default=25, help="distinct image/question pairs, cycled")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=1200)
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from vtprune.export.bundle import export_bundle
            from vtprune.models.config import PruneConfig
            from vtprune.models.loading import default_model_dir

            bundle = str(Path(tmp) / "embedded")
            export_bundle(default_model_dir(), Path(bundle), PruneConfig())
        pipe = Pipeline(Bundle.open(bundle), threads=1)
        work = samples(args.distinct, pipe, args.max_tokens)
        del pipe
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "vtprune.cli", "serve", "--bundle", bundle, "--port", str(port),
                                   "--queue-size", str(args.clients * 2), "--max-new-tokens", str(args.max_tokens)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start: {server.stderr.read()}")
                    time.sleep(0.2)
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda i: post(url, work[i % len(work)][0]), range(args.warmup)))
            rss = [(0, rss_mb(server.pid))]
            done, lock, records = [0], threading.Lock(), []
            stop_at = time.monotonic() + args.max_seconds

            def one(i: int) -> None:
                if time.monotonic() > stop_at:
                    return
                body, expected = work[i % len(work)]
                status, reply, seconds = post(url, body)
                ok = status == 200 and reply.get("vtprune", {}).get("token_ids") == expected
                with lock:
                    records.append({"i": i, "status": status, "correct": ok, "latency_ms": round(seconds * 1000, 2),
                                    "completion_tokens": reply.get("usage", {}).get("completion_tokens")})
                    done[0] += 1
                    if done[0] % 25 == 0:
                        rss.append((done[0], rss_mb(server.pid)))

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=30)
    lat = sorted(r["latency_ms"] for r in records)
    base = rss[0][1]
    peak = max(v for _, v in rss)
    summary = {
        "requests": len(records), "requested": args.requests, "ok": sum(r["status"] == 200 for r in records),
        "wrong_or_failed": sum(not r["correct"] for r in records), "statuses": sorted({r["status"] for r in records}),
        "requests_per_s": round(len(records) / wall, 3), "wall_s": round(wall, 2),
        "latency_p50_ms": round(statistics.median(lat), 2), "latency_p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
        "latency_max_ms": lat[-1], "completion_tokens_total": sum(r["completion_tokens"] or 0 for r in records),
        "rss_after_warmup_mb": round(base, 1), "rss_peak_mb": round(peak, 1), "rss_end_mb": round(rss[-1][1], 1),
        "rss_growth_pct": round(100 * (peak - base) / base, 2),
    }
    summary["memory_flat_within_10pct"] = summary["rss_growth_pct"] <= FLAT_PCT
    summary["none_lost_or_wrong"] = summary["wrong_or_failed"] == 0 and len(records) == args.requests
    result = {
        "benchmark": "serve_load", "command": " ".join(["python -m vtprune.benchmarks.serve_load", *(argv or sys.argv[1:])]),
        "model": "embedded (models/embedded/checkpoint), bundle fp32, paper pruning defaults", "clients": args.clients,
        "max_tokens": args.max_tokens, "distinct_requests": args.distinct, "warmup": args.warmup, "address": "127.0.0.1",
        "machine": {**machine_info(0, load), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "summary": summary, "rss_mb": [(n, round(v, 1)) for n, v in rss], "requests": sorted(records, key=lambda r: r["i"]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "serve_load.json", result)
    chart(result, out / "serve_load.png")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
