"""What quantising the frozen base costs (Q-LoRA, qwen_jax.model.lora): the logit KL of the
int8 / int4 / nf4 base against the bfloat16 base, on the reference model (`../shared/reference/
vectors`, or $QWEN_REF_VECTORS: the original release's layout, O(1) weights) and on a random
model of a real width, both over random tokens.

    python bench/qlora_kl.py [--tokens 256] [--group 16] [--width-hidden 1024]

KL(bf16 || quantised) is averaged over positions, in nats; top-1 is how often both pick the
same next token. Every layer projection is quantised (q, k, v, o, gate, up, down), as in a
Q-LoRA run; the embedding, norms and lm_head stay as they are.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen_jax.io import convert  # noqa: E402
from qwen_jax.model import lora  # noqa: E402
from qwen_jax.model.config import QwenConfig  # noqa: E402
from qwen_jax.model.transformer import Qwen, init_params  # noqa: E402


def logits(params, config, tokens):
    return np.asarray(jax.jit(lambda p, t: Qwen(config).apply({"params": p}, t)[0])(
        params, tokens), np.float64)


def kl_and_top1(ref, got):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(ref), log_softmax(got)
    kl = np.sum(np.exp(p) * (p - q), axis=-1)
    return float(kl.mean()), float((ref.argmax(-1) == got.argmax(-1)).mean())


def table(name, params, config, tokens, group):
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ref = logits(base, bf16, tokens)
    rows = []
    for quant in ("int8", "int4", "nf4"):
        qc = bf16.replace(lora_rank=1, base_quant=quant, base_quant_group=group)
        fresh = init_params(qc, jax.random.PRNGKey(0))
        quantised = jax.jit(lambda p, f, qc=qc: lora.attach(p, f, qc))(base, fresh)
        kl, top1 = kl_and_top1(ref, logits(quantised, qc, tokens))
        rows.append((quant, kl, top1))
    print(f"\n{name}: {tokens.shape[0]} x {tokens.shape[1]} random tokens, group {group} "
          "(int4 / nf4)")
    print("| base | KL(bf16 || quantised), nats/token | top-1 agreement |")
    print("|---|---|---|")
    for quant, kl, top1 in rows:
        print(f"| {quant} | {kl:.3e} | {top1:.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--width-hidden", type=int, default=1024)
    args = parser.parse_args()
    vectors = pathlib.Path(os.environ.get("QWEN_REF_VECTORS",
                                          ROOT.parent / "shared" / "reference" / "vectors"))
    config = convert.load_hf_config(vectors).replace(
        dtype="float32", param_dtype="float32", use_dynamic_ntk=False, use_logn_attn=False)
    params = convert.load_hf_params(vectors, config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, min(args.tokens,
                                                                   config.seq_length))))
    table(f"reference model ({vectors.name}: hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers)", params, config, tokens, args.group)
    h = args.width_hidden
    wide = QwenConfig(hidden_size=h, num_attention_heads=h // 128, num_hidden_layers=4,
                      intermediate_size=int(h * 5.375) // 64 * 128, kv_channels=128,
                      seq_length=2048, vocab_size=4096, dtype="float32", param_dtype="float32",
                      use_dynamic_ntk=False, use_logn_attn=False)
    tokens = jnp.asarray(rng.integers(0, wide.vocab_size, (2, args.tokens)))
    table(f"random model (hidden {h}, 4 layers, initializer_range 0.02)",
          init_params(wide, jax.random.PRNGKey(1)), wide, tokens, 64)


if __name__ == "__main__":
    main()
