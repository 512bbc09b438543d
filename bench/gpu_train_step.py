"""A Qwen-1.8B-shaped training step on one GPU: tokens/s and MFU per attention implementation.

Shape: Qwen-1.8B (hidden 2048, 16 heads of 128, 24 layers, MLP 5504 per branch, vocab 151,936)
at sequence 2048; bfloat16 compute over float32 master weights, the project's AdamW (0.9, 0.95,
1e-8, weight decay 0.1, global-norm clipping 1.0), the fused chunked loss, remat "minimal" (as
configs/1_8b.py), one microbatch of 16 sequences (32,768 tokens; about 30 GB of weights, grads
and moments plus activations, well inside an H200's 141 GB). A batch that runs out of memory
is halved and tried again.

Implementations: "pallas" (our Triton FlashAttention-2 kernel), "xla" (the model's plain-XLA
attention) and "cudnn" (jax.nn.dot_product_attention(implementation="cudnn") swapped in for
the XLA attention while the step is traced; GPU only. It drops the segment ids, which is exact
here: every row is one document, ids all 1; no window, no cache).

MFU counts qwen_jax.train.flops.train_flops_per_token (3x the forward matmuls and causal
attention; recomputation under remat is not counted) over H200_BF16_DENSE_PEAK_FLOPS.

    python bench/gpu_train_step.py                       # GPU: pallas, cudnn, xla
    python bench/gpu_train_step.py --smoke               # CPU: a tiny shape, the plumbing only

`--budget-s S` starts no further implementation once the time spent plus the longest one so
far would pass S seconds (bench/gpu_check.sh runs it under a hard timeout); `--json PATH`
writes the results after every implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwen_jax.model import attention as attention_mod  # noqa: E402
from qwen_jax.model.config import PRESETS, QwenConfig  # noqa: E402
from qwen_jax.parallel import sharding  # noqa: E402
from qwen_jax.train import flops  # noqa: E402
from qwen_jax.train.optim import OptimizerConfig  # noqa: E402
from qwen_jax.train.steps import Trainer  # noqa: E402

# NVIDIA H200 (SXM) dense BF16 Tensor Core peak: the datasheet's 1,979 TFLOP/s is "with
# sparsity", dense is half (the H100 SXM's figure; also qwen_jax/train/flops.py PEAK_FLOPS).
H200_BF16_DENSE_PEAK_FLOPS = 989e12

SEQ = 2048
BATCH = 16
# Qwen-1.8B (the released config, PRESETS["1_8b"]) trained at sequence 2048.
GPU_SHAPE = PRESETS["1_8b"].replace(seq_length=SEQ, max_position_embeddings=SEQ)
SMOKE_SEQ, SMOKE_BATCH = 64, 2
SMOKE_SHAPE = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16,
                         num_hidden_layers=2, intermediate_size=2 * 128, vocab_size=512,
                         seq_length=SMOKE_SEQ, max_position_embeddings=SMOKE_SEQ)


def cudnn_attention(q, k, v, *, causal=True, window=None, q_segment_ids=None,
                    kv_segment_ids=None, q_offset=0, scale=None, precision=None,
                    dropout_rate: float = 0.0, dropout_rng=None, **_):
    """The model's attention signature on cuDNN's fused kernel, for this benchmark only: the
    segment ids are dropped (every row here is one document)."""
    del q_segment_ids, kv_segment_ids, precision, dropout_rng
    # q_offset arrives traced (nn.scan broadcasts the model's 0); a cache would change q's length
    if window is not None or dropout_rate or q.shape[1] != k.shape[1] or \
            (isinstance(q_offset, int) and q_offset != 0):
        raise ValueError("cudnn_attention: training without windows, cache or dropout only")
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16  # cuDNN's
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       is_causal=causal, scale=scale, implementation="cudnn")
    return out.astype(v.dtype)


@contextlib.contextmanager
def attention_as(impl: str):
    """While tracing: 'cudnn' replaces the model's XLA attention; others change nothing."""
    if impl != "cudnn":
        yield
        return
    saved = attention_mod.IMPLEMENTATIONS["xla"]
    attention_mod.IMPLEMENTATIONS["xla"] = cudnn_attention
    try:
        yield
    finally:
        attention_mod.IMPLEMENTATIONS["xla"] = saved


def model_config(shape: QwenConfig, impl: str, remat: str) -> QwenConfig:
    return shape.replace(dtype="bfloat16", param_dtype="float32", remat_policy=remat,
                         attention_impl="pallas" if impl == "pallas" else "xla",
                         emb_dropout_prob=0.0, attn_dropout_prob=0.0)


def make_batch(config: QwenConfig, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, seq + 1))
    inputs = ids[:, :-1].astype(np.int32)
    return {"inputs": inputs, "targets": ids[:, 1:].astype(np.int32),
            "loss_mask": np.ones_like(inputs, np.float32)}


def run_impl(impl: str, shape: QwenConfig, batch: int, seq: int, remat: str, steps: int,
             warmup: int) -> dict:
    """Compile and time one implementation's train step; a dict of the results."""
    config = model_config(shape, impl, remat)
    trainer = Trainer(config, OptimizerConfig(warmup_steps=0, total_steps=1000),
                      sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    start = time.perf_counter()
    state = trainer.init_state(jax.random.PRNGKey(0))
    data = jax.device_put(make_batch(config, batch, seq), trainer.batch_sharding())
    rng = jax.random.PRNGKey(1)
    fn = trainer.jit_train_step()  # (its shardings trace the model's init, as init_state did)
    with attention_as(impl):  # only the step's own trace sees the swapped attention
        state, metrics = fn(state, data, rng)  # traces and compiles
        first_loss = float(metrics["loss"])
        compile_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            state, metrics = fn(state, data, rng)
        jax.block_until_ready(metrics["loss"])
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = fn(state, data, rng)
        last_loss = float(metrics["loss"])  # waits for the last step
        step_s = (time.perf_counter() - start) / steps
    tokens = batch * seq
    step_flops = flops.train_flops_per_token(config, seq) * tokens
    del state, metrics, fn, data
    return {"impl": impl, "batch": batch, "seq": seq, "remat": remat, "steps": steps,
            "compile_and_first_step_s": compile_s, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "tflops_per_s": step_flops / step_s / 1e12,
            "mfu": step_flops / step_s / H200_BF16_DENSE_PEAK_FLOPS,
            "first_loss": first_loss, "last_loss": last_loss,
            "finite": bool(np.isfinite(first_loss) and np.isfinite(last_loss))}


def out_of_memory(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text


def run_with_fallback(impl: str, shape, batch: int, seq: int, remat: str, steps: int,
                      warmup: int) -> dict:
    """run_impl, halving the batch while it runs out of memory."""
    while True:
        try:
            return run_impl(impl, shape, batch, seq, remat, steps, warmup)
        except Exception as err:
            if not out_of_memory(err) or batch == 1:
                raise
            print(f"{impl}: batch {batch} ran out of memory; trying {batch // 2}", flush=True)
            batch //= 2
        finally:
            gc.collect()
            jax.clear_caches()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape (CPU: the kernel interpreted); plumbing only")
    parser.add_argument("--impls", default="",
                        help="comma-separated of pallas, cudnn, xla (default: pallas,cudnn,xla "
                             "on GPU, pallas,xla elsewhere)")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--remat", default="minimal",
                        choices=("none", "minimal", "save_dot_except_mlp", "full"))
    parser.add_argument("--steps", type=int, default=0, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (>= 1)")
    parser.add_argument("--budget-s", type=float, default=0.0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    seq = args.seq or (SMOKE_SEQ if args.smoke else SEQ)
    batch = args.batch or (SMOKE_BATCH if args.smoke else BATCH)
    steps = args.steps or (2 if args.smoke else 5)
    impls = [i for i in (args.impls or ("pallas,cudnn,xla" if backend == "gpu"
                                        else "pallas,xla")).split(",") if i]
    if args.smoke and backend != "gpu":
        # the GPU (Triton) kernel, interpreted, rather than the CPU default (the TPU kernel)
        os.environ.setdefault("QWEN_JAX_PALLAS_BACKEND", "gpu")
    device = jax.devices()[0]
    print(f"jax {jax.__version__} backend={backend} device={device.device_kind}; "
          f"{shape.num_params() / 1e6:,.1f}M params (hidden {shape.hidden_size}, "
          f"{shape.num_attention_heads} heads of {shape.head_dim}, {shape.num_hidden_layers} "
          f"layers, MLP {shape.mlp_width}, vocab {shape.vocab_size}); batch {batch} x {seq}, "
          f"remat {args.remat}, {steps} timed steps; MFU over "
          f"{H200_BF16_DENSE_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 dense bf16)", flush=True)

    report = {"backend": backend, "device": device.device_kind, "jax": jax.__version__,
              "params": shape.num_params(), "peak_flops": H200_BF16_DENSE_PEAK_FLOPS,
              "results": []}
    started, longest, failed = time.perf_counter(), 0.0, False
    for impl in impls:
        elapsed = time.perf_counter() - started
        if impl not in ("pallas", "cudnn", "xla"):
            row = {"impl": impl, "error": "unknown implementation"}
        elif impl == "cudnn" and backend != "gpu":
            row = {"impl": impl, "skipped": f"cudnn needs a GPU (backend {backend})"}
        elif args.budget_s and elapsed + longest > args.budget_s:
            row = {"impl": impl, "skipped": f"time budget: {elapsed:.0f} s spent, the longest "
                                            f"implementation took {longest:.0f} s"}
        else:
            t0 = time.perf_counter()
            try:
                row = run_with_fallback(impl, shape, batch, seq, args.remat, steps,
                                        max(1, args.warmup))
            except Exception as err:
                row = {"impl": impl, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            longest = max(longest, time.perf_counter() - t0)
        if "error" in row or ("finite" in row and not row["finite"]):
            failed = True
        report["results"].append(row)
        if "step_s" in row:
            print(f"{impl:<7} batch {row['batch']:>3} x {row['seq']}: step {row['step_s']:.3f} s,"
                  f" {row['tokens_per_s']:,.0f} tokens/s, {row['tflops_per_s']:.1f} TFLOP/s, "
                  f"MFU {100 * row['mfu']:.1f}% (compile + first step "
                  f"{row['compile_and_first_step_s']:.0f} s; loss {row['first_loss']:.3f} -> "
                  f"{row['last_loss']:.3f})", flush=True)
        else:
            print(f"{impl:<7} {row.get('error') or 'skipped: ' + row['skipped']}", flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
