"""Prefill and decode throughput of `qwen_jax.generate` against transformers (PyTorch) on the
same weights, side by side (CPU; greedy; no stop tokens, so every run makes all its tokens).

    python bench/generate.py [--hidden 1024] [--heads 8] [--layers 6] [--vocab 151936]
                             [--prompt-len 128] [--new-tokens 32] [--batch-sizes 1,8]
                             [--loops python,while] [--repeats 3]

A random model is exported with the converter's writer (the layout `convert_hf.py export`
writes) and loaded as transformers' Qwen2ForCausalLM (`qwen_jax.hf_reference`). Each side is
timed generating 1 token (= prefill) and N tokens; prefill tokens/s = batch x prompt / t(1),
decode tokens/s = batch x (N - 1) / (t(N) - t(1)); medians of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from qwen_jax.infer.generate import GenerationConfig, generate  # noqa: E402
from qwen_jax.io import (
    convert,  # noqa: E402
    hf_reference,
)
from qwen_jax.model.config import QwenConfig  # noqa: E402
from qwen_jax.model.transformer import init_params, unstack_layers  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rates(run, batch, prompt_len, new_tokens, repeats):
    t1 = timed(lambda: run(1), repeats)
    tn = timed(lambda: run(new_tokens), repeats)
    return batch * prompt_len / t1, batch * (new_tokens - 1) / max(tn - t1, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--loops", default="python,while", help="qwen_jax decode loops to time")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    mlp = (args.hidden * 8 // 3 + 255) // 256 * 256  # Qwen's ~2.7x MLP width
    config = QwenConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                        num_hidden_layers=args.layers, intermediate_size=2 * mlp,
                        kv_channels=args.hidden // args.heads, seq_length=2048,
                        vocab_size=args.vocab, use_dynamic_ntk=False, use_logn_attn=False,
                        dtype="float32", param_dtype="float32", attention_impl="xla")
    params = init_params(config, jax.random.PRNGKey(0))
    with tempfile.TemporaryDirectory() as tmp:
        convert.write_hf(pathlib.Path(tmp), jax.device_get(params), config)
        hf_model = hf_reference.build_qwen2(tmp, config, args.prompt_len + args.new_tokens)
    if jax.default_backend() == "cpu":  # what the CLIs do on CPU: see model.unstack_layers
        params, config = unstack_layers(params, config)
    print(f"model: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, vocab "
          f"{args.vocab}, {config.num_params() / 1e6:.0f}M parameters, float32; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}, {os.cpu_count()} CPU cores")

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = np.random.default_rng(batch).integers(0, args.vocab, (batch, args.prompt_len))
        ids = torch.from_numpy(prompts)

        def run_hf(n):
            with torch.no_grad():
                return hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)

        hf_rates = rates(run_hf, batch, args.prompt_len, args.new_tokens, args.repeats)
        rows.append((batch, "transformers", *hf_rates, 1.0, 1.0))
        for loop in args.loops.split(","):
            def run_ours(n, loop=loop):
                return generate(params, config, prompts.tolist(),
                                GenerationConfig(max_new_tokens=n, do_sample=False), loop=loop)

            ours = rates(run_ours, batch, args.prompt_len, args.new_tokens, args.repeats)
            rows.append((batch, f"qwen_jax ({loop} loop)", *ours, ours[0] / hf_rates[0],
                         ours[1] / hf_rates[1]))
        same = (run_ours(args.new_tokens).tokens
                == run_hf(args.new_tokens)[:, args.prompt_len:].numpy()).mean()
        print(f"batch {batch}: greedy tokens equal to transformers' at {same:.0%} of positions")

    print("\n| batch | implementation | prefill tok/s | decode tok/s | prefill x | decode x |")
    print("|---|---|---|---|---|---|")
    for batch, name, pre, dec, pre_x, dec_x in rows:
        print(f"| {batch} | {name} | {pre:,.0f} | {dec:,.1f} | {pre_x:.2f} | {dec_x:.2f} |")


if __name__ == "__main__":
    main()
