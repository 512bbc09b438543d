"""Training throughput on this machine: our jitted train step against transformers' Qwen2 with
torch AdamW, on the same shape, side by side in one run.

Shape (issue "Prove it scales"): hidden 1024, 8 heads of 128, 4 layers, MLP 2816, vocab
151,936, batch 4 x 512, AdamW (0.9, 0.95, 1e-8, wd 0.1) with global-norm clipping 1.0. Each
framework runs in each dtype given and its best is compared. torch's bfloat16 run keeps its
weights and AdamW moments in bfloat16; ours runs bfloat16 both with float32 master weights
(the default) and, like torch, with bfloat16 weights. Also reports achieved FLOP/s over the
machine's measured matmul peak in the row's compute dtype (the best of jax and torch GEMMs).
The table rows run one after another; the final ratio comes from our best and torch's best
run interleaved (ours, torch, ours, torch, ...), as the median of the per-pair ratios with
their min and max, so that a slow or fast phase of the machine cannot decide it.

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

from qwen_jax.model.config import QwenConfig  # noqa: E402
from qwen_jax.parallel import sharding
from qwen_jax.train import flops  # noqa: E402
from qwen_jax.train.optim import OptimizerConfig  # noqa: E402
from qwen_jax.train.steps import Trainer  # noqa: E402

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


def ours_step(dtype: str, param_dtype: str = "float32"):
    """One of our train steps, compiled and warmed up: a callable that runs a step."""
    config = SHAPE.replace(dtype=dtype, param_dtype=param_dtype)
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

    step()
    step()
    return step


def torch_train_step(dtype: str):
    """transformers' Qwen2 + torch AdamW, warmed up: a callable that runs a step."""
    import torch

    from qwen_jax.io.hf_reference import qwen2_config

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

    step()
    step()
    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def mean_step(make, steps: int, *args) -> float:
    step = make(*args)
    seconds = sum(timed(step) for _ in range(steps)) / steps
    del step
    gc.collect()
    return seconds


def interleaved(ours_args, torch_dtype, pairs: int) -> list[tuple[float, float]]:
    """(ours, torch) step seconds, alternating ours, torch, ours, torch, ...: both see the
    same machine state, so a slow phase of the machine moves both sides of each pair."""
    a, b = ours_step(*ours_args), torch_train_step(torch_dtype)
    out = [(timed(a), timed(b)) for _ in range(pairs)]
    del a, b
    gc.collect()
    return out


def matmul_peak(dtype: str) -> float:
    """Best GEMM FLOP/s this machine reaches in `dtype` (jax with float32 accumulation and
    torch, a square n = 2048 product and one of the model's projection shapes)."""
    import torch

    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (BATCH * SEQ, SHAPE.hidden_size, SHAPE.mlp_width)):
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        jax_s = time_steps(lambda: f(a, b).block_until_ready(), 10)
        ta = torch.ones((m, k), dtype=getattr(torch, dtype))
        tb = torch.ones((k, n), dtype=getattr(torch, dtype))
        torch_s = time_steps(lambda: ta @ tb, 10)
        best = max(best, 2 * m * k * n / min(jax_s, torch_s))
    return best


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
    dtypes = args.dtypes.split(",")
    peaks = {dtype: matmul_peak(dtype) for dtype in dtypes}
    rows = []  # (framework, compute dtype, weights dtype, seconds)
    for dtype in dtypes:
        rows.append(("qwen_jax", dtype, "float32", mean_step(ours_step, args.steps, dtype)))
        if dtype != "float32":
            rows.append(("qwen_jax", dtype, dtype,
                         mean_step(ours_step, args.steps, dtype, dtype)))
        rows.append(("torch+transformers", dtype, dtype,
                     mean_step(torch_train_step, args.steps, dtype)))
    print("\n| framework | compute | weights | step s | tokens/s | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for name, dtype, weights, seconds in rows:
        achieved = step_flops / seconds
        print(f"| {name} | {dtype} | {weights} | {seconds:.3f} | {tokens / seconds:,.0f} | "
              f"{achieved / 1e9:.1f} | {100 * achieved / peaks[dtype]:.1f}% |")
    best_ours = min((r for r in rows if r[0] == "qwen_jax"), key=lambda r: r[3])
    best_torch = min((r for r in rows if r[0] != "qwen_jax"), key=lambda r: r[3])
    print()
    for dtype, peak in peaks.items():
        print(f"measured {dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s")
    _, dtype, weights, _ = best_ours
    pairs = interleaved((dtype, weights), best_torch[1], args.steps)
    ratios = sorted(t / o for o, t in pairs)
    ours_median = float(np.median([o for o, _ in pairs]))
    print(f"interleaved: our best ({dtype} compute, {weights} weights) against torch's best "
          f"({best_torch[1]}), {len(pairs)} pairs; per-pair speed-up min {ratios[0]:.2f}x, "
          f"max {ratios[-1]:.2f}x")
    print(f"our best achieved: {100 * step_flops / ours_median / peaks[dtype]:.1f}% of the "
          f"{dtype} peak (median step {ours_median:.3f} s)")
    print(f"speed-up over torch (best vs best): {float(np.median(ratios)):.2f}x")


if __name__ == "__main__":
    main()
