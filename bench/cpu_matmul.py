"""The training step's matrix products on this CPU, XLA (jax) against torch, one product at a
time and side by side: which of bench/train_step.py's products XLA CPU runs near torch's
rate and which not.

Shapes from bench/train_step.py (4 x 512 tokens, hidden 1024, MLP 2816, vocabulary
151,936), bfloat16 operands in the same layouts on both sides (the second operand row-major
[k, n], or [n, k] where the product contracts its last axis, as the model's lm_head
gradient does). jax accumulates and returns float32, as the model's products do; torch
returns bfloat16, as transformers' do (a sum over slices adds in float32 on both sides).
Each product runs jax, torch, jax, torch, ... and the best and median rate of each side are
reported; both results are checked against each other first.

    python bench/cpu_matmul.py [--reps 5]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwen_jax.model.layers import dot32  # noqa: E402
from qwen_jax.model.loss import sliced_hidden_grad, vocab_slices  # noqa: E402

TOKENS, HIDDEN, MLP, VOCAB = 4 * 512, 1024, 2816, 151936


def products(tokens=TOKENS, hidden=HIDDEN, mlp=MLP, vocab=VOCAB):
    """(name, m, k, n, second operand stored [n, k], vocabulary slices or 0)."""
    return [
        ("lm_head forward: hidden x kernel", tokens, hidden, vocab, False, 0),
        ("lm_head kernel gradient: hidden^T x dlogits", hidden, tokens, vocab, False, 0),
        ("lm_head hidden gradient: dlogits x kernel^T", tokens, vocab, hidden, True, 0),
        ("  the same, summed over vocabulary slices", tokens, vocab, hidden, True,
         len(vocab_slices(vocab))),
        ("attention qkv: x x w_qkv", tokens, hidden, 3 * hidden, False, 0),
        ("mlp up or gate: x x w", tokens, hidden, mlp, False, 0),
        ("mlp down: h x w", tokens, mlp, hidden, False, 0),
    ]


def jax_product(transposed: bool, slices: int):
    """The model's product: dot32, or with slices the loss's CPU hidden gradient itself."""
    if slices:
        return jax.jit(lambda a, b: sliced_hidden_grad(a, b, None))
    return jax.jit(lambda a, b: dot32(a, b, 1 if transposed else 0, None))


def torch_product(transposed: bool, slices: int, k: int):
    def f(a, b):
        out = None
        for lo, hi in vocab_slices(k) if slices else [(0, k)]:
            p = a[:, lo:hi] @ (b[:, lo:hi].t() if transposed else b[lo:hi])
            if slices:  # the slices' sum in float32, as jax's
                p = p.float()
            out = p if out is None else out + p
        return out

    return f


def measure(rows, reps: int):
    """[(name, m, k, n, jax GFLOP/s best, median, torch best, median)]."""
    import torch

    out = []
    rng = np.random.default_rng(0)
    for name, m, k, n, transposed, slices in rows:
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((n, k) if transposed else (k, n), np.float32)
        ja, jb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        ta, tb = (torch.from_numpy(x).to(torch.bfloat16) for x in (a, b))
        jf, tf = jax_product(transposed, slices), torch_product(transposed, slices, k)
        got, want = np.asarray(jf(ja, jb)), tf(ta, tb).float().numpy()
        scale = float(np.abs(want).max()) or 1.0
        err = float(np.abs(got - want).max()) / scale
        if err > 2e-2:  # bf16 results from float32 sums: a few ulp of bf16, not more
            raise SystemExit(f"error: {name}: jax and torch differ by {err:.3g} of the largest "
                             "value; expected the same product")
        jax_s, torch_s = [], []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(jf(ja, jb))
            jax_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            tf(ta, tb)
            torch_s.append(time.perf_counter() - start)
        flop = 2.0 * m * k * n
        out.append((name, m, k, n, flop / min(jax_s) / 1e9, flop / np.median(jax_s) / 1e9,
                    flop / min(torch_s) / 1e9, flop / np.median(torch_s) / 1e9))
        del ja, jb, ta, tb
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.reps < 1:
        raise SystemExit(f"error: --reps {args.reps}: expected at least 1")
    import torch

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); bfloat16 operands, {args.reps} interleaved "
          "repetitions, GFLOP/s best (median)")
    print("\n| product | m x k x n | jax | torch | jax / torch (best) |")
    print("|---|---|---|---|---|")
    for name, m, k, n, jb, jm, tb, tm in measure(products(), args.reps):
        print(f"| {name} | {m} x {k} x {n} | {jb:.0f} ({jm:.0f}) | {tb:.0f} ({tm:.0f}) | "
              f"{jb / tb:.2f} |")


if __name__ == "__main__":
    main()
