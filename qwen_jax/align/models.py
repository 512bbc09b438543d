"""The models of alignment on the Qwen backbone: per-token log-probabilities of a language
model (DPO, the PPO policy and reference), and scalar heads (the reward and value models).

A reward or value model's parameters are the decoder's without `lm_head`, plus
`score.kernel` [hidden, 1] (transformers' `Qwen2ForSequenceClassification` layout: a linear
map of the final-norm hidden state, no bias). The reward of a sequence is the head at its
last non-padding position (the report's pooling "based on a specific end token": the data
puts `<|endoftext|>` or `<|im_end|>` there); a value model reads the head at every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax.align.losses import entropy_from_logits
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import jnp_dtype, precision
from qwen_jax.model.loss import fused_cross_entropy
from qwen_jax.model.transformer import Qwen, init_params, param_shardings
from qwen_jax.train.steps import ParamSpec

SCORE = "score"


def _apply(params, config: QwenConfig, tokens, segments, head, *, train=False, rng=None):
    out, _ = Qwen(config).apply({"params": params}, tokens, segment_ids=segments, train=train,
                                rngs={"dropout": rng} if train and rng is not None else None,
                                head=head)
    return out


# ------------------------------------------------------------------------ language models
def token_logprobs(params, config: QwenConfig, tokens, segments, *, train=False, rng=None,
                   chunk_tokens: int = 4096, with_entropy: bool = False):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) as [B, T-1] float32 (the lm_head fused with the
    log-softmax chunk by chunk: no [B, T, V] logits), and with_entropy: the entropy of each
    of those next-token distributions [B, T-1] (no gradient)."""
    def head(hidden, _to_logits):
        h = hidden[:, :-1]
        kernel = params["lm_head"]["kernel"]
        logp = -fused_cross_entropy(h, kernel, tokens[:, 1:], dtype=jnp_dtype(config.dtype),
                                    chunk_tokens=chunk_tokens, precision=precision(config))
        if not with_entropy:
            return logp
        return logp, _entropy(jax.lax.stop_gradient(h), jax.lax.stop_gradient(kernel),
                              jnp_dtype(config.dtype), chunk_tokens)

    return _apply(params, config, tokens, segments, head, train=train, rng=rng)


def _entropy(hidden, kernel, dtype, chunk_tokens: int):
    b, t, _ = hidden.shape
    length = max(1, min(t, chunk_tokens // max(b, 1)))
    pad = -t % length
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).astype(dtype)
    chunks = jnp.swapaxes(h.reshape(b, -1, length, h.shape[-1]), 0, 1)

    def one(hc):
        return entropy_from_logits(jnp.einsum("bth,hv->btv", hc, kernel.astype(dtype),
                                              preferred_element_type=jnp.float32))

    out = jax.lax.map(one, chunks)  # [n, B, length]
    return jnp.swapaxes(out, 0, 1).reshape(b, -1)[:, :t]


def sequence_logprobs(params, config, tokens, segments, response, **kwargs):
    """Sum of the log-probabilities of the response tokens (`response` [B, T] marks them)."""
    logp = token_logprobs(params, config, tokens, segments, **kwargs)
    return jnp.sum(logp * response[:, 1:].astype(jnp.float32), axis=1)


# ------------------------------------------------------------------------ scalar heads
def init_scalar_params(config: QwenConfig, rng, backbone=None):
    """A reward/value model: `backbone` (a language model's or a reward model's parameters;
    default random) without lm_head, and a score head drawn N(0, initializer_range^2) like
    transformers' (a reward model's own head is kept)."""
    k_backbone, k_head = jax.random.split(rng)
    if backbone is None:
        backbone = init_params(config, k_backbone)
    params = {k: v for k, v in backbone.items() if k != "lm_head"}
    if SCORE not in params:
        std = getattr(config, "initializer_range", 0.02)
        params[SCORE] = {"kernel": std * jax.random.normal(
            k_head, (config.hidden_size, 1), jnp_dtype(config.param_dtype))}
    return params


def scalar_shardings(config: QwenConfig, mesh):
    shardings = {k: v for k, v in param_shardings(config, mesh).items() if k != "lm_head"}
    shardings[SCORE] = {"kernel": NamedSharding(mesh, PartitionSpec())}
    return shardings


# A Trainer of the reward / value model: `dataclasses.replace(trainer, params=SCALAR_PARAMS)`.
SCALAR_PARAMS = ParamSpec(init=init_scalar_params, shardings=scalar_shardings)


def abstract_scalar_params(config: QwenConfig, shardings=None):
    shapes = jax.eval_shape(lambda: init_scalar_params(config, jax.random.PRNGKey(0)))
    if shardings is None:
        return shapes
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def values(params, config: QwenConfig, tokens, segments, *, train=False, rng=None):
    """The head at every position [B, T] float32."""
    kernel = params[SCORE]["kernel"]

    def head(hidden, _to_logits):
        return jnp.einsum("bth,ho->bto", hidden, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)[..., 0]

    return _apply(params, config, tokens, segments, head, train=train, rng=rng)


def last_index(segments):
    """Each row's last non-padding position (left or right padding)."""
    idx = jnp.arange(segments.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(segments > 0, idx, -1), axis=1)


def rewards(params, config: QwenConfig, tokens, segments, *, train=False, rng=None):
    """The reward of each sequence [B]: the head at its last non-padding token."""
    v = values(params, config, tokens, segments, train=train, rng=rng)
    return jnp.take_along_axis(v, last_index(segments)[:, None], axis=1)[:, 0]
