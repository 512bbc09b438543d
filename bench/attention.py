"""Attention throughput: our Pallas kernel vs jax.nn.dot_product_attention vs the XLA reference.

    python bench/attention.py                       # GPU/TPU: seq 2k, 8k, 32k, bf16, D=128
    python bench/attention.py --seqs 256,512        # CPU (the kernel runs interpreted: slow)

TFLOP/s count 4*B*N*Tq*Tk*D for the forward (halved when causal) and 2.5x that again for the
backward. A row that runs out of memory or fails prints the error class instead of a number.
`--json PATH` also writes the rows there (bench/gpu_check.sh reads them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_jax.model.attention import attention, xla_attention  # noqa: E402


def impls(backend: str):
    cudnn = "cudnn" if backend == "gpu" else None  # XLA's own fused attention elsewhere
    return {
        "pallas": lambda q, k, v, causal: attention(q, k, v, causal=causal, impl="pallas"),
        f"jax.nn.dpa({cudnn or 'xla'})": lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=cudnn),
        "xla_reference": lambda q, k, v, causal: xla_attention(q, k, v, causal=causal),
    }


def timed(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args):
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(f"backend={backend} device={jax.devices()[0].device_kind} dtype={dtype.name} "
          f"heads={args.heads} head_dim={args.head_dim} causal={args.causal} "
          f"tokens/batch={args.tokens}")
    print(f"{'impl':<22}{'seq':>7}{'batch':>6}{'fwd ms':>10}{'fwd TF/s':>10}"
          f"{'fwd+bwd ms':>12}{'f+b TF/s':>10}")
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        keys = jax.random.split(jax.random.PRNGKey(seq), 3)
        q, k, v = (jax.random.normal(key, (batch, seq, args.heads, args.head_dim), dtype)
                   for key in keys)
        flops = 4 * batch * args.heads * seq * seq * args.head_dim * (0.5 if args.causal else 1)
        for name, fn in impls(backend).items():
            if name not in args.impls and name.split("(")[0] not in args.impls:
                continue
            fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, args.causal))
            grad = jax.jit(jax.grad(
                lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, args.causal).astype(jnp.float32)),
                argnums=(0, 1, 2)))
            cells = []
            row = {"impl": name, "seq": seq, "batch": batch}
            for part, f, work in (("fwd", fwd, flops), ("fwd_bwd", grad, 3.5 * flops)):
                try:
                    sec = timed(f, (q, k, v), args.iters)
                    cells.append(f"{sec * 1e3:>10.2f}{work / sec / 1e12:>10.3f}")
                    row[f"{part}_ms"], row[f"{part}_tflops"] = sec * 1e3, work / sec / 1e12
                except Exception as err:  # OOM at 32k for the reference, no cuDNN, ...
                    cells.append(f"{type(err).__name__[:18]:>20}")
                    row[f"{part}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(f"{name:<22}{seq:>7}{batch:>6}{cells[0]}  {cells[1]}", flush=True)
            if args.json:  # after every row: a run cut short by a timeout keeps its rows
                Path(args.json).write_text(json.dumps(
                    {"backend": backend, "device": jax.devices()[0].device_kind,
                     "dtype": dtype.name, "heads": args.heads, "head_dim": args.head_dim,
                     "causal": args.causal, "tokens": args.tokens, "iters": args.iters,
                     "rows": rows}, indent=1))


def main(argv=None):
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="256,512" if on_cpu else "2048,8192,32768",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", type=int, default=512 if on_cpu else 32768,
                        help="batch = max(1, tokens // seq)")
    parser.add_argument("--heads", type=int, default=2 if on_cpu else 16)
    parser.add_argument("--head-dim", type=int, default=64 if on_cpu else 128)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"),
                        default=True)
    parser.add_argument("--iters", type=int, default=2 if on_cpu else 10)
    parser.add_argument("--impls", default="pallas,jax.nn.dpa,xla_reference",
                        type=lambda s: s.split(","))
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
