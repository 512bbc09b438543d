"""Serving throughput and latency: continuous batching against the same engine serving one
request at a time, side by side in one run (CPU).

    python bench/serve.py [--hidden 256] [--heads 4] [--layers 4] [--vocab 151936]
                          [--slots 32] [--concurrency 1,8,16,32] [--max-tokens 64]
                          [--requests-per-client 2]

A random model with the real Qwen vocabulary (when ../shared/reference/qwen.tiktoken is
there; else the byte tokenizer) is saved as a checkpoint and served twice by
`python -m qwen_jax.serve` on 127.0.0.1: with --max-batch 1 (one request at a time) and with
--max-batch SLOTS (continuous batching). At each concurrency C, C clients each send
--requests-per-client streamed chat requests (greedy, a different question each, max_tokens
tokens; random weights rarely write a stop token, so nearly every request makes all of them).
Throughput = completion tokens (the `usage` of each answer) / wall time; latency = a request's
whole time; TTFT = the time to its first streamed token. The last line is the goal's ratio:
continuous-batching throughput over one-at-a-time throughput at concurrency 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx  # noqa: E402
import jax  # noqa: E402

from qwen_jax.io.checkpoint import save_checkpoint  # noqa: E402
from qwen_jax.model.config import QwenConfig  # noqa: E402
from qwen_jax.model.transformer import init_params  # noqa: E402

TIKTOKEN = ROOT.parent / "shared" / "reference" / "qwen.tiktoken"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, slots: int, log_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_jax.serve", "--checkpoint", str(checkpoint),
             "--port", str(self.port), "--max-batch", str(slots), "--max-queue", "256",
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout=600.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready in {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


async def one_request(http, url, question, max_tokens):
    """(completion tokens, latency s, time to first token s) of one streamed chat request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"HTTP {resp.status_code}: {await resp.aread()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get(
                    "content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return tokens, end - start, (first or end) - start


async def load(url, concurrency: int, per_client: int, max_tokens: int):
    """C clients, each sending its requests one after another."""
    results = []

    async def client(c):
        async with httpx.AsyncClient(timeout=3600) as http:
            for k in range(per_client):
                question = f"Question {c}-{k}: what do you know about the number {c * 97 + k}?"
                results.append(await one_request(http, url, question, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return results, time.perf_counter() - start


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    config = QwenConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                        num_hidden_layers=args.layers, intermediate_size=4 * args.hidden,
                        kv_channels=args.hidden // args.heads, seq_length=2048,
                        vocab_size=args.vocab, dtype="float32", param_dtype="float32")
    tokenizer = TIKTOKEN if TIKTOKEN.is_file() and args.vocab >= 151851 else None
    print(f"model: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, vocab "
          f"{args.vocab} ({config.num_params() / 1e6:.0f}M parameters, float32), "
          f"{'Qwen' if tokenizer else 'byte'} tokenizer; greedy, max_tokens "
          f"{args.max_tokens}, {args.requests_per_client} requests per client; "
          f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPU cores")
    rows, throughput = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(pathlib.Path(tmp) / "bench",
                               jax.device_get(init_params(config, jax.random.PRNGKey(0))),
                               config, tokenizer_file=tokenizer)
        for name, slots in (("one at a time", 1), ("continuous batching", args.slots)):
            server = Server(ckpt, slots, pathlib.Path(tmp) / f"server{slots}.log")
            try:
                server.wait_ready()
                asyncio.run(load(server.url, 1, 1, args.max_tokens))  # first-request costs
                for c in levels:
                    results, wall = asyncio.run(load(server.url, c, args.requests_per_client,
                                                     args.max_tokens))
                    tokens = sum(r[0] for r in results)
                    latency, ttft = [r[1] for r in results], [r[2] for r in results]
                    throughput[name, c] = tokens / wall
                    rows.append((name, slots, c, len(results), tokens, tokens / wall,
                                 statistics.median(latency), pct(latency, 0.99),
                                 statistics.median(ttft), pct(ttft, 0.99)))
                    print(f"  {name}: concurrency {c} done in {wall:.1f} s", flush=True)
            finally:
                server.stop()
    print("\n| engine | slots | concurrency | requests | tokens | tokens/s | p50 latency s "
          "| p99 latency s | p50 TTFT s | p99 TTFT s | x one at a time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, slots, c, n, tokens, tps, l50, l99, t50, t99 in rows:
        ratio = tps / throughput["one at a time", c]
        print(f"| {name} | {slots} | {c} | {n} | {tokens} | {tps:.1f} | {l50:.2f} | {l99:.2f} "
              f"| {t50:.2f} | {t99:.2f} | {ratio:.2f} |")
    if 16 in levels:
        ratio = throughput["continuous batching", 16] / throughput["one at a time", 16]
        print(f"\nthroughput at 16 concurrent requests, continuous batching over one at a "
              f"time: {ratio:.2f}x (goal >= 4x: {'met' if ratio >= 4 else 'NOT met'})")


if __name__ == "__main__":
    main()
