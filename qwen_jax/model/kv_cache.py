"""A preallocated, fixed-shape KV cache that jit carries as a pytree.

All rows write at one shared slot index, so a batch of left-padded prompts decodes in lockstep;
each row keeps its own next position (its RoPE/LogN position) and its own dynamic-NTK level,
which the original computes on the call that starts the cache and keeps for every cached step
(report §2.5; reference case d_decode_across_seq_length).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qwen_jax.model.config import QwenConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, heads, max_len, head_dim]
    v: jax.Array  # [layers, batch, heads, max_len, head_dim]
    segment_ids: jax.Array  # [batch, max_len] int32: 1 = a real token, 0 = empty or padding
    index: jax.Array  # [] int32: the next slot to write
    next_position: jax.Array  # [batch] int32: position of each row's next token
    ntk_level: jax.Array  # [batch] int32: dynamic NTK level fixed by the first call

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(config: QwenConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache; `dtype` defaults to the config's compute dtype."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_len,
             config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
        ntk_level=jnp.zeros((batch_size,), jnp.int32),
    )


def cache_bytes(config: QwenConfig, batch_size: int, max_len: int, dtype=None) -> int:
    """Memory of a cache: 2 x layers x batch x max_len x hidden x itemsize (+ small per-row
    state)."""
    itemsize = jnp.dtype(dtype or config.dtype).itemsize
    kv = 2 * config.num_hidden_layers * batch_size * max_len * config.hidden_size * itemsize
    return kv + 4 * (batch_size * max_len + 2 * batch_size + 1)


CACHE_LOGICAL_AXES = KVCache(
    k=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    v=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    segment_ids=("cache_batch", "cache_length"),
    index=(),
    next_position=("cache_batch",),
    ntk_level=("cache_batch",),
)
