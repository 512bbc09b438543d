"""A preallocated, fixed-shape KV cache that jit carries as a pytree.

All rows write at one shared slot index, so a batch of left-padded prompts decodes in lockstep;
each row keeps its own next position (its RoPE/LogN position) and its own dynamic-NTK level,
which the original computes on the call that starts the cache and keeps for every cached step
(report §2.5; reference case d_decode_across_seq_length).

Two kinds of cache: a float one in any dtype (default the config's compute dtype), and "int8",
the original release's `use_cache_quantization` (its `quantize_cache_v` /
`dequantize_cache_torch`). Every appended chunk (the prompt at prefill, one token per decoding
step) is quantised asymmetrically to uint8 with one scale and zero point per (row, head): over
the chunk's positions and head_dim, scale = (max - min) / 255, zero = -min / scale (not rounded,
no epsilon), q = uint8(clamp(x / scale + zero, 0, 255)) truncating; read back as
scale x (q - zero). The arithmetic runs in the compute dtype, as the original's does in the
model's; scale and zero are stored in float32 per cached position (each slot knows the chunk it
came from). The chunk is quantised BEFORE attention, so even the prefill attends to dequantised
keys and values. Two deliberate differences, both invisible on an unpadded batch: padding
positions (segment id 0) are left out of a row's min/max, so a left-padded request gets the
scale/zero it gets alone (the original takes them over the padded chunk), and a chunk with
max == min gets scale 1 (exact) where the original divides by zero.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from qwen_jax.model.config import QwenConfig

QMAX = 255.0  # uint8: torch.iinfo(torch.uint8).max; qmin is 0
# --kv-cache names -> init_cache dtypes
KV_CACHE_KINDS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int8": "int8"}


@flax.struct.dataclass
class QuantizedKV:
    """The int8 cache's keys or values (layout of the float cache, one scale/zero per slot)."""
    q: jax.Array  # [layers, batch, heads, max_len, head_dim] uint8
    scale: jax.Array  # [layers, batch, heads, max_len] float32
    zero: jax.Array  # [layers, batch, heads, max_len] float32

    @property
    def shape(self):
        return self.q.shape


@flax.struct.dataclass
class KVCache:
    k: jax.Array | QuantizedKV  # [layers, batch, heads, max_len, head_dim]
    v: jax.Array | QuantizedKV  # [layers, batch, heads, max_len, head_dim]
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

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantizedKV)


def is_int8(dtype) -> bool:
    """Whether an init_cache `dtype` asks for the quantised cache ("int8")."""
    return isinstance(dtype, str) and dtype == "int8"


def cache_dtype(dtype):
    """A --kv-cache name ("bf16", "int8", ...) or float dtype -> what init_cache takes (None
    stays None: the config's compute dtype); ValueError for anything else."""
    if dtype is None or is_int8(dtype):
        return dtype
    try:
        out = jnp.dtype(KV_CACHE_KINDS.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        out = None
    if out is None or not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"KV cache {dtype!r}: expected 'int8', a float dtype or one of "
                         f"{sorted(KV_CACHE_KINDS)}")
    return out


def init_cache(config: QwenConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache; `dtype` defaults to the config's compute dtype; "int8" is the original's
    quantised cache (uint8 + float32 scale/zero per slot)."""
    shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_len,
             config.head_dim)
    dtype = cache_dtype(dtype)
    if is_int8(dtype):
        def make():
            return QuantizedKV(q=jnp.zeros(shape, jnp.uint8),
                               scale=jnp.zeros(shape[:-1], jnp.float32),
                               zero=jnp.zeros(shape[:-1], jnp.float32))
        k, v = make(), make()
    else:
        dtype = jnp.dtype(dtype or config.dtype)
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return KVCache(
        k=k,
        v=v,
        segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
        ntk_level=jnp.zeros((batch_size,), jnp.int32),
    )


def cache_bytes(config: QwenConfig, batch_size: int, max_len: int, dtype=None) -> int:
    """Memory of a cache: 2 x layers x batch x max_len x heads x (head_dim x itemsize), plus
    for "int8" (itemsize 1) a float32 scale and zero per head and slot, plus small per-row
    state."""
    dtype = cache_dtype(dtype)
    heads, head_dim = config.num_attention_heads, config.head_dim
    if is_int8(dtype):
        per_head = head_dim + 2 * 4
    else:
        per_head = head_dim * jnp.dtype(dtype or config.dtype).itemsize
    kv = 2 * config.num_hidden_layers * batch_size * max_len * heads * per_head
    return kv + 4 * (batch_size * max_len + 2 * batch_size + 1)


# ------------------------------------------------------------------------ quantisation
def _divide(a, b):
    """a / b exactly as written, for operands of one shape: XLA rewrites a division by a
    constant or a broadcast into a multiplication by the (rounded) reciprocal, which moves
    x / scale + zero across truncation boundaries; the barrier hides what b is."""
    return a / jax.lax.optimization_barrier(b)


def quantize(x, valid=None):
    """The original's quantize_cache_v over one chunk x [B, T, N, D] (compute dtype) ->
    (q [B, T, N, D] uint8, scale [B, N], zero [B, N], both in x's dtype). min/max run over
    the chunk's positions and head_dim of each (row, head); positions where `valid` [B, T] is
    False (padding) are left out of them."""
    dt = x.dtype
    if valid is None:
        fmax, fmin = jnp.max(x, axis=(1, 3)), jnp.min(x, axis=(1, 3))
    else:
        keep = valid[:, :, None, None]
        fmax = jnp.max(jnp.where(keep, x, -jnp.inf), axis=(1, 3))
        fmin = jnp.min(jnp.where(keep, x, jnp.inf), axis=(1, 3))
        any_real = jnp.any(valid, axis=1)[:, None]  # an all-padding row: scale 1, zero 0
        fmax, fmin = jnp.where(any_real, fmax, 0), jnp.where(any_real, fmin, 0)
    scale = _divide(fmax - fmin, jnp.full(fmax.shape, QMAX, dt))
    scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)  # original: 0 -> NaN
    zero = jnp.asarray(0, dt) - _divide(fmin, scale)
    y = _divide(x, jnp.broadcast_to(scale[:, None, :, None], x.shape)) + zero[:, None, :, None]
    q = jnp.clip(y, jnp.asarray(0, dt), jnp.asarray(QMAX, dt)).astype(jnp.uint8)  # truncates
    return q, scale, zero


def dequantize(q, scale, zero, dtype):
    """scale x (q - zero) in `dtype` (the original's dequantize_cache_torch); scale/zero have
    q's shape without its last axis."""
    scale, zero = scale.astype(dtype)[..., None], zero.astype(dtype)[..., None]
    return scale * (q.astype(dtype) - zero)


def write_layer(cache, x, layer, offset, valid=None):
    """Write chunk x [B, T, N, D] of layer `layer` at slot `offset` into a stacked cache entry
    (a float [L, B, N, S, D] array or a QuantizedKV, quantised here), in place."""
    layer, offset = jnp.asarray(layer, jnp.int32), jnp.asarray(offset, jnp.int32)
    zero_ = jnp.zeros((), jnp.int32)
    if not isinstance(cache, QuantizedKV):
        x = jnp.swapaxes(x, 1, 2).astype(cache.dtype)[None]
        return jax.lax.dynamic_update_slice(cache, x, (layer, zero_, zero_, offset, zero_))
    q, scale, zero = quantize(x, valid)
    per_slot = (1, x.shape[0], x.shape[2], x.shape[1])  # [1, B, N, T]: one value per slot
    return QuantizedKV(
        q=jax.lax.dynamic_update_slice(cache.q, jnp.swapaxes(q, 1, 2)[None],
                                       (layer, zero_, zero_, offset, zero_)),
        scale=jax.lax.dynamic_update_slice(
            cache.scale, jnp.broadcast_to(scale.astype(jnp.float32)[None, :, :, None], per_slot),
            (layer, zero_, zero_, offset)),
        zero=jax.lax.dynamic_update_slice(
            cache.zero, jnp.broadcast_to(zero.astype(jnp.float32)[None, :, :, None], per_slot),
            (layer, zero_, zero_, offset)))


def read_layer(cache, layer, dtype):
    """Layer `layer` of a stacked cache entry as [B, S, N, D] in `dtype` (dequantised)."""
    if isinstance(cache, QuantizedKV):
        out = dequantize(cache.q[layer], cache.scale[layer], cache.zero[layer], dtype)
    else:
        out = cache[layer].astype(dtype)
    return jnp.swapaxes(out, 1, 2)


CACHE_LOGICAL_AXES = KVCache(
    k=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    v=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    segment_ids=("cache_batch", "cache_length"),
    index=(),
    next_position=("cache_batch",),
    ntk_level=("cache_batch",),
)


def cache_logical_axes(cache: KVCache) -> KVCache:
    """The logical axis names of `cache`'s arrays (CACHE_LOGICAL_AXES for a float cache)."""
    if not cache.quantized:
        return CACHE_LOGICAL_AXES
    axes = CACHE_LOGICAL_AXES.k
    entry = QuantizedKV(q=axes, scale=axes[:-1], zero=axes[:-1])
    return CACHE_LOGICAL_AXES.replace(k=entry, v=entry)
