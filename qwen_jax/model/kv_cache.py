"""A preallocated, fixed-shape KV cache that jit carries as a pytree.

Two ways to index it. `generate`'s: all rows write at one shared slot index (`index` a
scalar), so a batch of left-padded prompts decodes in lockstep. The server's slot cache
(`per_row=True`): each row writes at its own index (`index` [B]) and advances by its own real
tokens, so rows hold unrelated requests at different lengths and a row can be emptied and
refilled while the others decode. Either way each row keeps its own next position (its
RoPE/LogN position) and its own dynamic-NTK level, which the original computes on the call that
starts the cache and keeps for every cached step (report §2.5; reference case
d_decode_across_seq_length): -1 means "not fixed yet" (the next call fixes it); a caller that
prefills a prompt in chunks sets it from the whole prompt's length beforehand.

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
    index: jax.Array  # [] int32: the next slot to write ([batch] in a per-row cache)
    next_position: jax.Array  # [batch] int32: position of each row's next token
    ntk_level: jax.Array  # [batch] int32: dynamic NTK level (-1: fixed by the next call)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return isinstance(self.k, QuantizedKV)

    @property
    def per_row(self) -> bool:
        return self.index.ndim == 1


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


def init_cache(config: QwenConfig, batch_size: int, max_len: int, dtype=None,
               per_row: bool = False) -> KVCache:
    """An empty cache; `dtype` defaults to the config's compute dtype; "int8" is the original's
    quantised cache (uint8 + float32 scale/zero per slot). `per_row`: every row has its own
    write index (module doc)."""
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
        index=jnp.zeros((batch_size,) if per_row else (), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
        ntk_level=jnp.full((batch_size,), -1, jnp.int32),
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


def _per_row_slots(offset, length: int, rows=None):
    """(rows [B, 1], slots [B, T]): where each row's chunk goes in a per-row cache (`rows`:
    the cache rows of the chunk's rows, default 0..B-1)."""
    if rows is None:
        rows = jnp.arange(offset.shape[0], dtype=jnp.int32)
    return rows[:, None], offset[:, None] + jnp.arange(length, dtype=jnp.int32)[None]


def write_layer(cache, x, layer, offset, valid=None, rows=None):
    """Write chunk x [B, T, N, D] of layer `layer` at slot `offset` into a stacked cache entry
    (a float [L, B, N, S, D] array or a QuantizedKV, quantised here), in place. `offset` [B]
    (a per-row cache) writes each row at its own slot, into cache row `rows[b]` if given;
    slots past the end are dropped."""
    layer, offset = jnp.asarray(layer, jnp.int32), jnp.asarray(offset, jnp.int32)
    zero_ = jnp.zeros((), jnp.int32)
    if offset.ndim == 0:  # generate's shared index
        def put(arr, upd):  # upd [B, T, N(, D)] into arr [L, B, N, S(, D)]
            start = (layer, zero_, zero_, offset) + (zero_,) * (arr.ndim - 4)
            return jax.lax.dynamic_update_slice(arr, jnp.swapaxes(upd, 1, 2)[None], start)
    elif rows is None and x.shape[1] == 1:
        # One token per row into every row (a decode step over the whole cache): the layer
        # rewritten with a select, which XLA updates in place also when the rows are
        # sharded (a scatter over a sharded batch copies the whole cache).
        def put(arr, upd):
            return _update_rows(arr, jnp.swapaxes(upd, 1, 2), layer, offset)
    else:
        cache_rows, slots = _per_row_slots(offset, x.shape[1], rows)

        def put(arr, upd):
            return arr.at[layer, cache_rows, :, slots].set(upd, mode="drop")
    if not isinstance(cache, QuantizedKV):
        return put(cache, x.astype(cache.dtype))
    q, scale, zero = quantize(x, valid)

    def per_slot(v):  # [B, N] -> [B, T, N]: each slot knows the chunk it came from
        return jnp.broadcast_to(v.astype(jnp.float32)[:, None], x.shape[:3])

    return QuantizedKV(q=put(cache.q, q), scale=put(cache.scale, per_slot(scale)),
                       zero=put(cache.zero, per_slot(zero)))


def _update_rows(arr, update, layer, offset):
    """arr [L, B, N, S, ...] with update [B, N, 1, ...] written at layer `layer`, slot
    offset[b] of each row b (an offset past the end writes nothing)."""
    zero_ = jnp.zeros((), jnp.int32)
    start = (layer,) + (zero_,) * (arr.ndim - 1)
    current = jax.lax.dynamic_slice(arr, start, (1,) + arr.shape[1:])[0]
    hit = jnp.arange(arr.shape[3], dtype=jnp.int32)[None, :] == offset[:, None]  # [B, S]
    hit = hit.reshape(hit.shape[0], 1, hit.shape[1], *(1,) * (arr.ndim - 4))
    return jax.lax.dynamic_update_slice(arr, jnp.where(hit, update, current)[None], start)


def write_segments(segment_ids, q_seg, offset, rows=None):
    """The cache's segment ids [B, S] with the chunk's [B, T] written at `offset` ([] or
    [B]; in a per-row cache into cache rows `rows` if given, slots past the end dropped)."""
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 0:
        return jax.lax.dynamic_update_slice(segment_ids, q_seg, (0, offset))
    if rows is None and q_seg.shape[1] == 1:  # one token into every row: a batched update
        return jax.vmap(lambda s, q, o: jax.lax.dynamic_update_slice(s, q, (o,)))(
            segment_ids, q_seg, offset)
    rows, slots = _per_row_slots(offset, q_seg.shape[1], rows)
    return segment_ids.at[rows, slots].set(q_seg, mode="drop")


def read_layer(cache, layer, dtype, length: int | None = None, rows=None):
    """Layer `layer` of a stacked cache entry as [B, S, N, D] in `dtype` (dequantised); with
    `length`, only its first `length` slots (what a step that writes no further reads); with
    `rows`, only those cache rows."""
    def part(x):
        x = x[layer] if rows is None else x[layer, rows]
        return x if length is None else x[:, :, :length]

    if isinstance(cache, QuantizedKV):
        out = dequantize(part(cache.q), part(cache.scale), part(cache.zero), dtype)
    else:
        out = part(cache).astype(dtype)
    return jnp.swapaxes(out, 1, 2)


CACHE_LOGICAL_AXES = KVCache(
    k=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    v=("layers", "cache_batch", "cache_heads", "cache_length", "cache_kv"),
    segment_ids=("cache_batch", "cache_length"),
    index=(),  # ("cache_batch",) in a per-row cache
    next_position=("cache_batch",),
    ntk_level=("cache_batch",),
)


def cache_logical_axes(cache: KVCache) -> KVCache:
    """The logical axis names of `cache`'s arrays (CACHE_LOGICAL_AXES for a float cache)."""
    out = CACHE_LOGICAL_AXES
    if cache.per_row:
        out = out.replace(index=("cache_batch",))
    if not cache.quantized:
        return out
    axes = CACHE_LOGICAL_AXES.k
    entry = QuantizedKV(q=axes, scale=axes[:-1], zero=axes[:-1])
    return out.replace(k=entry, v=entry)
