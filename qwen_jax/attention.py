"""The attention function of the model, behind one stable signature.

    attention(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, q_offset, impl)

q [B, Tq, N, D], k/v [B, Tk, N, D]. Query i sits at key index `q_offset + i` (0 for a plain
forward; the cache write index for cached calls), so one signature covers training, prefill,
chunked prefill and single-token decoding. Masking is by key index:

- causal: key j is visible to query i when j <= q_offset + i;
- window W > 0: additionally j > q_offset + i - W (the W most recent keys, itself included);
- segment ids: only keys of the query's own segment (packed documents, padding, empty cache
  slots all use this).

The 1/sqrt(head_dim) scale is applied here; LogN scaling is not (the query arrives scaled).
`impl="xla"` is the plain-XLA reference; kernels register themselves in `IMPLEMENTATIONS`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(q_len: int, kv_len: int, *, causal: bool = True, window=None,
                   q_segment_ids=None, kv_segment_ids=None, q_offset=0):
    """Boolean mask [B or 1, Tq, Tk]: True where query i may attend to key j."""
    q_idx = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    mask = jnp.ones((q_len, kv_len), bool)
    if causal:
        mask = kv_idx <= q_idx
    if window is not None:
        window = jnp.asarray(window, jnp.int32)
        mask &= (window <= 0) | (kv_idx > q_idx - window)
    mask = mask[None]
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids go together")
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def xla_attention(q, k, v, *, causal=True, window=None, q_segment_ids=None,
                  kv_segment_ids=None, q_offset=0, scale=None, precision=None,
                  dropout_rate: float = 0.0, dropout_rng=None):
    """Reference attention: float32 scores and softmax, probabilities cast to v's dtype."""
    _, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_len, kv_len, causal=causal, window=window,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                          q_offset=q_offset)
    scores = jnp.where(mask[:, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v, precision=precision)


IMPLEMENTATIONS: dict[str, Callable] = {"xla": xla_attention}


def resolve_impl(impl: str) -> str:
    """'auto' picks the fastest implementation registered for the running backend."""
    if impl != "auto":
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl {impl!r} is not available; "
                             f"expected one of {sorted(IMPLEMENTATIONS)} or 'auto'")
        return impl
    backend = jax.default_backend()
    if backend in ("tpu", "gpu") and "pallas" in IMPLEMENTATIONS:
        return "pallas"
    return "xla"


def attention(q, k, v, *, causal: bool = True, window=None, q_segment_ids=None,
              kv_segment_ids=None, q_offset=0, impl: str = "auto", **kwargs):
    """Dispatch to an implementation; see the module docstring for the semantics."""
    fn = IMPLEMENTATIONS[resolve_impl(impl)]
    return fn(q, k, v, causal=causal, window=window, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, q_offset=q_offset, **kwargs)
