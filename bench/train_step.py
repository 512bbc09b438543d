"""Training throughput on this machine: our jitted train step against transformers' Qwen2 with
torch AdamW, on the same shape, side by side in one run.

Shape (issue "Prove it scales"): hidden 1024, 8 heads of 128, 4 layers, MLP 2816, vocab
151,936, batch 4 x 512, AdamW (0.9, 0.95, 1e-8, wd 0.1) with global-norm clipping 1.0. Each
framework runs in each dtype given and its best is compared. Also reports our achieved FLOP/s
over the machine's measured matmul peak (the best of jax and torch on a large float32 GEMM).

    python bench/train_step.py [--steps 10] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwen_jax import flops, sharding  # noqa: E402
from qwen_jax.config import QwenConfig  # noqa: E402
from qwen_jax.optim import OptimizerConfig  # noqa: E402
from qwen_jax.trainer import Trainer  # noqa: E402

SHAPE = QwenConfig(hidden_size=1024, num_attention_heads=8, kv_channels=128, num_hidden_layers=4,
                   intermediate_size=2 * 2816, vocab_size=151936, seq_length=512,
                   max_position_embeddings=512, attention_impl="xla")
BATCH, SEQ = 4, 512


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SHAPE.vocab_size, (BATCH, SEQ + 1))
    return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)


def time_steps(step, steps: int) -> float:
    step()  # compile / warm up
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def ours(dtype: str, steps: int) -> float:
    config = SHAPE.replace(dtype=dtype, param_dtype="float32")
    trainer = Trainer(config, OptimizerConfig(warmup_steps=0, total_steps=1000),
                      sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state = [trainer.init_state(jax.random.PRNGKey(0))]
    inputs, targets = batch()
    data = {"inputs": inputs, "targets": targets, "loss_mask": np.ones_like(inputs, np.float32)}
    fn = trainer.jit_train_step()
    rng = jax.random.PRNGKey(1)

    def step():
        state[0], metrics = fn(state[0], data, rng)
        jax.block_until_ready(metrics["loss"])

    seconds = time_steps(step, steps)
    del state, fn
    gc.collect()
    return seconds


def torch_step(dtype: str, steps: int) -> float:
    import torch

    from qwen_jax.hf_reference import qwen2_config

    torch.manual_seed(0)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = __import__("transformers").Qwen2ForCausalLM(qwen2_config(SHAPE, SEQ))
    model.config._attn_implementation = "sdpa"  # torch's fastest attention on CPU
    model = model.to(torch_dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    inputs, targets = (torch.from_numpy(x.astype(np.int64)) for x in batch())

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, steps)
    del model, opt
    gc.collect()
    return seconds


def matmul_peak() -> float:
    """Best float32 GEMM FLOP/s this machine reaches (jax and torch, n = 2048)."""
    import torch

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax_s = time_steps(lambda: f(a).block_until_ready(), 10)
    t = torch.ones((n, n))
    torch_s = time_steps(lambda: t @ t, 10)
    return 2 * n ** 3 / min(jax_s, torch_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    import torch

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {BATCH} x {SEQ}, {args.steps} steps")
    tokens = BATCH * SEQ
    step_flops = flops.train_flops_per_token(SHAPE, SEQ) * tokens
    peak = matmul_peak()
    rows = []
    for dtype in args.dtypes.split(","):
        rows.append(("qwen_jax", dtype, ours(dtype, args.steps)))
        rows.append(("torch+transformers", dtype, torch_step(dtype, args.steps)))
    print(f"\n| framework | dtype | step s | tokens/s | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|")
    for name, dtype, seconds in rows:
        print(f"| {name} | {dtype} | {seconds:.3f} | {tokens / seconds:,.0f} | "
              f"{step_flops / seconds / 1e9:.1f} | {100 * step_flops / seconds / peak:.1f}% |")
    best_ours = min(s for n, _, s in rows if n == "qwen_jax")
    best_torch = min(s for n, _, s in rows if n != "qwen_jax")
    print(f"\nmeasured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"our best achieved: {100 * step_flops / best_ours / peak:.1f}% of peak")
    print(f"speed-up over torch (best vs best): {best_torch / best_ours:.2f}x")


if __name__ == "__main__":
    main()
