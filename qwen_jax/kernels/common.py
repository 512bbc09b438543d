"""What the TPU and GPU flash-attention kernels share: block visibility, element masks, padding
and the custom VJP.

Semantics are those of `qwen_jax.attention` (query i sits at key index q_offset + i). Runtime
scalars travel in `meta` = int32 [q_offset, window] so a traced per-layer window or cache offset
needs no recompilation. A query row that sees no key at all gets output 0 (the XLA reference
gives the mean of v there); the model never produces such rows (every token sees itself).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# lse of a row that sees nothing: exp(s - EMPTY_LSE) == 0 in the backward pass.
EMPTY_LSE = 1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int

    def fit(self, q_len: int, kv_len: int, minimum: int,
            power_of_two: bool = False) -> "BlockSizes":
        """Shrink blocks to the (padded) sequence so short calls do not pad to a full block.
        `power_of_two`: shrink only to powers of two (Triton needs every tile shape to be one;
        the default blocks are)."""
        q_cap = max(minimum, _round_up(q_len, minimum))
        k_cap = max(minimum, _round_up(kv_len, minimum))
        if power_of_two:
            q_cap, k_cap = _next_power_of_two(q_cap), _next_power_of_two(k_cap)
        return BlockSizes(min(self.block_q, q_cap), min(self.block_k, k_cap),
                          min(self.block_q_bwd, q_cap), min(self.block_k_bwd, k_cap))

    @property
    def q_multiple(self) -> int:
        return math.lcm(self.block_q, self.block_q_bwd)

    @property
    def k_multiple(self) -> int:
        return math.lcm(self.block_k, self.block_k_bwd)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static facts of one call (hashable: a nondiff argument of the custom VJP)."""
    causal: bool
    q_len: int
    kv_len: int
    scale: float
    has_segments: bool
    blocks: BlockSizes
    interpret: bool
    options: tuple = ()  # backend-specific (name, value) pairs, e.g. the TPU generation


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def idiv(a, b: int):
    """Floor division of a non-negative traced int32 by a static block size (lowers everywhere)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def block_visibility(q_first, q_rows: int, k_first, k_cols: int, meta, spec: Spec):
    """(run, full) for the tile of queries [q_first, +q_rows) x keys [k_first, +k_cols):
    `run` = some pair is visible (else the tile is skipped); `full` = every pair is (no mask)."""
    q_offset, window = meta
    first_q = q_offset + q_first
    last_q = first_q + q_rows - 1
    last_k = k_first + k_cols - 1
    run = (q_first < spec.q_len) & (k_first < spec.kv_len)
    full = last_k < spec.kv_len
    if spec.causal:
        run = run & (k_first <= last_q)
        full = full & (last_k <= first_q)
    windowed = window > 0
    run = run & (~windowed | (last_k > first_q - window))
    full = full & (~windowed | (k_first > last_q - window))
    return run, full


def segment_visibility(q_min, q_max, k_min, k_max):
    """(run, full) from the segment-id ranges of a query block and a key block."""
    run = (q_min <= k_max) & (k_min <= q_max)
    full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    return run, full


def element_mask(q_idx, k_idx, meta, spec: Spec, q_seg=None, kv_seg=None):
    """True where query index q_idx may see key index k_idx (arrays broadcast together)."""
    q_offset, window = meta
    q_pos = q_offset + q_idx
    mask = k_idx < spec.kv_len
    if spec.causal:
        mask = mask & (k_idx <= q_pos)
    mask = mask & ((window <= 0) | (k_idx > q_pos - window))
    if q_seg is not None:
        mask = mask & (q_seg == kv_seg)
    return mask


def kv_block_range(qi, bq: int, bk: int, meta, spec: Spec):
    """First and last key block that query block qi may see (clamped into [0, nk-1])."""
    q_offset, window = meta
    first_q = q_offset + qi * bq
    last_block = (spec.kv_len - 1) // bk
    lo = jnp.where(window > 0, idiv(jnp.maximum(first_q - window + 1, 0), bk), 0)
    hi = jnp.int32(last_block)
    if spec.causal:
        hi = jnp.minimum(hi, idiv(first_q + bq - 1, bk))
    return jnp.minimum(lo, hi), hi


def q_block_range(ki, bq: int, bk: int, meta, spec: Spec):
    """First and last query block that may see key block ki (clamped into [0, nq-1])."""
    q_offset, window = meta
    last_block = (spec.q_len - 1) // bq
    lo = jnp.int32(0)
    if spec.causal:
        lo = idiv(jnp.maximum(ki * bk - q_offset, 0), bq)
    newest = jnp.maximum(ki * bk + bk - 2 - q_offset + window, 0)
    hi = jnp.where(window > 0, jnp.minimum(last_block, idiv(newest, bq)), last_block)
    return jnp.minimum(lo, hi), hi


def pad_axis(x, axis: int, multiple: int, mode: str = "constant"):
    extra = _round_up(x.shape[axis], multiple) - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def segment_ranges(seg, block: int):
    """Per-block (min, max) of padded segment ids [B, T] -> two int32 [B, T // block]."""
    s = seg.reshape(seg.shape[0], -1, block)
    return s.min(axis=-1), s.max(axis=-1)


def make_meta(q_offset, window):
    window = 0 if window is None else window
    return jnp.stack([jnp.asarray(q_offset, jnp.int32).reshape(()),
                      jnp.asarray(window, jnp.int32).reshape(())])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash_attention(backend, spec: Spec, q, k, v, q_seg, kv_seg, meta):
    """q [B, Tq, N, D], k/v [B, Tk, N, D]; `backend` is a kernel module with forward/backward."""
    return backend.forward(q, k, v, q_seg, kv_seg, meta, spec)[0]


def _flash_fwd(backend, spec, q, k, v, q_seg, kv_seg, meta):
    out, lse = backend.forward(q, k, v, q_seg, kv_seg, meta, spec)
    return out, (q, k, v, q_seg, kv_seg, meta, out, lse)


def _flash_bwd(backend, spec, residuals, d_out):
    q, k, v, q_seg, kv_seg, meta, out, lse = residuals
    dq, dk, dv = backend.backward(q, k, v, q_seg, kv_seg, meta, out, lse, d_out, spec)
    return dq, dk, dv, None, None, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)
