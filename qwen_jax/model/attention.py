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
`impl="xla"` is the plain-XLA reference; `impl="pallas"` is our FlashAttention-2 kernel
(`qwen_jax.kernels`: Mosaic on TPU, Triton on GPU, interpreted on CPU), run under `shard_map`
when a mesh is in context. Kernels register themselves in `IMPLEMENTATIONS`.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_jax.parallel.sharding import target_platform

_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(q_len: int, kv_len: int, *, causal: bool = True, window=None,
                   q_segment_ids=None, kv_segment_ids=None, q_offset=0):
    """Boolean mask [B or 1, Tq, Tk]: True where query i may attend to key j. `q_offset` is a
    scalar or [B] (each row's queries at their own key index: a per-row KV cache)."""
    q_offset = jnp.asarray(q_offset, jnp.int32)
    q_offset = q_offset[:, None, None] if q_offset.ndim == 1 else q_offset[None, None, None]
    q_idx = q_offset + jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        mask = kv_idx <= q_idx
    if window is not None:
        window = jnp.asarray(window, jnp.int32)
        mask &= (window <= 0) | (kv_idx > q_idx - window)
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
    if q_len == 1:
        # One query (decode): matrix-vector products per (row, head) with no unit dimension,
        # which XLA runs on a heads-major KV cache in place instead of transposing it.
        scores = jnp.einsum("bnkd,bnd->bnk", jnp.swapaxes(k, 1, 2), q[:, 0], precision=precision,
                            preferred_element_type=jnp.float32)[:, :, None] * scale
    else:
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
    if q_len == 1:
        return jnp.einsum("bnk,bnkd->bnd", probs[:, :, 0].astype(v.dtype), jnp.swapaxes(v, 1, 2),
                          precision=precision)[:, None]
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v, precision=precision)


_BATCH_AXES = ("data", "fsdp")  # as qwen_jax.sharding: batch over data/fsdp, heads over tensor
_HEAD_AXIS = "tensor"


def _mesh_axes(mesh, names, size: int):
    """The free (non-manual) axes of `names` in `mesh`, dropping trailing ones until their
    product divides `size` (e.g. a batch of 1 while decoding on a data-parallel mesh)."""
    axes = [a for a in names if a in mesh.axis_names and a not in mesh.manual_axes]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def pallas_attention(q, k, v, *, causal=True, window=None, q_segment_ids=None,
                     kv_segment_ids=None, q_offset=0, scale=None, precision=None,
                     dropout_rate: float = 0.0, dropout_rng=None, backend: str | None = None,
                     interpret: bool | None = None, block_sizes=None):
    """FlashAttention-2 kernel with the reference semantics (float32 inputs run their matmuls
    at full precision, so `precision` is not needed). The kernels have no dropout: a call with
    dropout goes to the XLA reference. `backend` ("tpu" | "gpu") defaults to the platform (the
    TPU kernel on CPU); `interpret` defaults to True on CPU or with QWEN_JAX_PALLAS_INTERPRET=1.
    """
    from qwen_jax.kernels import flash_attention

    # Dropout, and per-row query offsets (a slot cache decoding), go to the XLA reference.
    if (dropout_rate > 0.0 and dropout_rng is not None) or jnp.ndim(q_offset) == 1:
        return xla_attention(q, k, v, causal=causal, window=window, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, q_offset=q_offset, scale=scale,
                             precision=precision, dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng)
    platform = target_platform()
    if backend is None:
        backend = os.environ.get("QWEN_JAX_PALLAS_BACKEND", "gpu" if platform == "gpu" else "tpu")
    if interpret is None:
        interpret = platform == "cpu" or os.environ.get("QWEN_JAX_PALLAS_INTERPRET") == "1"
    window = jnp.asarray(0 if window is None else window, jnp.int32)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    segments = q_segment_ids is not None or kv_segment_ids is not None
    if segments and (q_segment_ids is None or kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")

    def call(q, k, v, window, q_offset, *segs):
        return flash_attention(q, k, v, causal=causal, window=window, q_offset=q_offset,
                               q_segment_ids=segs[0] if segs else None,
                               kv_segment_ids=segs[1] if segs else None, scale=scale,
                               backend=backend, block_sizes=block_sizes, interpret=interpret)

    segs = (q_segment_ids, kv_segment_ids) if segments else ()
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(q, k, v, window, q_offset, *segs)
    batch = _mesh_axes(mesh, _BATCH_AXES, q.shape[0]) or None
    heads = _mesh_axes(mesh, (_HEAD_AXIS,), q.shape[2]) or None
    act, seg = P(batch, None, heads, None), P(batch, None)
    in_specs = (act, act, act, P(), P()) + (seg,) * len(segs)
    sharded = jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=act, check_vma=False)
    return sharded(q, k, v, window, q_offset, *segs)


IMPLEMENTATIONS: dict[str, Callable] = {"xla": xla_attention, "pallas": pallas_attention}


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
