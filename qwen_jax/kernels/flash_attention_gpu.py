"""FlashAttention-2 for GPU (Pallas/Triton): forward, dq and dk/dv kernels.

The data stays in the model's [B, T, N, D] layout (Triton loads strided tiles). The grid is
(outer block, batch, head); each program walks the inner blocks of the visible band with a
`fori_loop` whose traced bounds come from q_offset and the window, so tiles outside the band are
never loaded. Inside the band a tile whose segment-id ranges do not meet is skipped by `cond`,
and only tiles straddling a mask edge pay for the mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.kernels import common
from qwen_jax.kernels.common import EMPTY_LSE, MASK_VALUE, BlockSizes, Spec

# FA2-style tiles for Ampere/Hopper: 128x64 forward, 64x64 backward (dq and dk/dv).
DEFAULT_BLOCKS = BlockSizes(128, 64, 64, 64)


def default_block_sizes() -> BlockSizes:
    return DEFAULT_BLOCKS


def _dot(a, b, trans_a=False, trans_b=False):
    # Explicit either way: a global 'highest' default would ask Mosaic for fp32 bf16 matmuls.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile(run, full, masked_step, plain_step, carry):
    """Skip invisible tiles; mask only tiles straddling an edge."""
    return lax.cond(run, lambda c: lax.cond(full, plain_step, masked_step, c), lambda c: c, carry)


def _visibility(qi, ki, bq, bk, meta, spec, q_seg, kv_seg):
    """(run, full) of the tile (query block qi, key block ki): positions, then segment ids."""
    run, full = common.block_visibility(qi * bq, bq, ki * bk, bk, meta, spec)
    if spec.has_segments:
        seg_run, seg_full = common.segment_visibility(q_seg.min(), q_seg.max(), kv_seg.min(),
                                                      kv_seg.max())
        run, full = run & seg_run, full & seg_full
    return run, full


def _fwd_kernel(meta_ref, q_ref, k_ref, v_ref, *refs, spec, bq, bk):
    if spec.has_segments:
        qseg_ref, kvseg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    qi = pl.program_id(0)
    meta = (meta_ref[0], meta_ref[1])
    q = q_ref[...]
    q_seg = qseg_ref[...] if spec.has_segments else None
    q_idx = qi * bq + jnp.arange(bq, dtype=jnp.int32)

    def body(ki, carry):
        keys = pl.ds(ki * bk, bk)
        kv_seg = kvseg_ref[keys] if spec.has_segments else None
        run, full = _visibility(qi, ki, bq, bk, meta, spec, q_seg, kv_seg)

        def step(masked, carry):
            acc, m_prev, l_prev = carry
            v = v_ref[keys, :]
            s = _dot(q, k_ref[keys, :], trans_b=True) * spec.scale
            if masked:
                k_idx = ki * bk + jnp.arange(bk, dtype=jnp.int32)
                mask = common.element_mask(
                    q_idx[:, None], k_idx[None, :], meta, spec,
                    *((q_seg[:, None], kv_seg[None, :]) if spec.has_segments else ()))
                s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m_prev, s.max(axis=1))
            p = jnp.exp(s - m_new[:, None])
            if masked:  # rows with nothing visible yet have m_new == MASK_VALUE
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_new)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, alpha * l_prev + p.sum(axis=1)

        return _tile(run, full, functools.partial(step, True), functools.partial(step, False),
                     carry)

    lo, hi = common.kv_block_range(qi, bq, bk, meta, spec)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi + 1, body, init)
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, EMPTY_LSE, m + jnp.log(l))


def _dq_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, bq, bk):
    if spec.has_segments:
        qseg_ref, kvseg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    qi = pl.program_id(0)
    meta = (meta_ref[0], meta_ref[1])
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...] if spec.has_segments else None
    q_idx = qi * bq + jnp.arange(bq, dtype=jnp.int32)

    def body(ki, dq):
        keys = pl.ds(ki * bk, bk)
        kv_seg = kvseg_ref[keys] if spec.has_segments else None
        run, full = _visibility(qi, ki, bq, bk, meta, spec, q_seg, kv_seg)

        def step(masked, dq):
            k = k_ref[keys, :]
            p = jnp.exp(_dot(q, k, trans_b=True) * spec.scale - lse[:, None])
            if masked:
                k_idx = ki * bk + jnp.arange(bk, dtype=jnp.int32)
                mask = common.element_mask(
                    q_idx[:, None], k_idx[None, :], meta, spec,
                    *((q_seg[:, None], kv_seg[None, :]) if spec.has_segments else ()))
                p = jnp.where(mask, p, 0.0)
            ds = p * (_dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)

        return _tile(run, full, functools.partial(step, True), functools.partial(step, False), dq)

    lo, hi = common.kv_block_range(qi, bq, bk, meta, spec)
    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkdv_kernel(meta_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, bq, bk):
    if spec.has_segments:
        qseg_ref, kvseg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    ki = pl.program_id(0)
    meta = (meta_ref[0], meta_ref[1])
    k, v = k_ref[...], v_ref[...]
    kv_seg = kvseg_ref[...] if spec.has_segments else None
    k_idx = ki * bk + jnp.arange(bk, dtype=jnp.int32)

    def body(qi, carry):
        rows = pl.ds(qi * bq, bq)
        q_seg = qseg_ref[rows] if spec.has_segments else None
        run, full = _visibility(qi, ki, bq, bk, meta, spec, q_seg, kv_seg)

        def step(masked, carry):
            dk, dv = carry
            q, do = q_ref[rows, :], do_ref[rows, :]
            p = jnp.exp(_dot(q, k, trans_b=True) * spec.scale - lse_ref[rows][:, None])
            if masked:
                q_idx = qi * bq + jnp.arange(bq, dtype=jnp.int32)
                mask = common.element_mask(
                    q_idx[:, None], k_idx[None, :], meta, spec,
                    *((q_seg[:, None], kv_seg[None, :]) if spec.has_segments else ()))
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

        return _tile(run, full, functools.partial(step, True), functools.partial(step, False),
                     carry)

    lo, hi = common.q_block_range(ki, bq, bk, meta, spec)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi + 1, body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(dim: int):
    return plgpu.CompilerParams(num_warps=4 if dim <= 64 else 8, num_stages=2)


def _pad(q, k, v, q_seg, kv_seg, spec):
    pq = lambda x: common.pad_axis(x, 1, spec.blocks.q_multiple)  # noqa: E731
    pk = lambda x: common.pad_axis(x, 1, spec.blocks.k_multiple)  # noqa: E731
    if spec.has_segments:
        q_seg = common.pad_axis(q_seg.astype(jnp.int32), 1, spec.blocks.q_multiple, "edge")
        kv_seg = common.pad_axis(kv_seg.astype(jnp.int32), 1, spec.blocks.k_multiple, "edge")
    return pq, pq(q), pk(k), pk(v), q_seg, kv_seg


def forward(q, k, v, q_seg, kv_seg, meta, spec: Spec):
    batch, _, heads, dim = q.shape
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    _, qp, kp, vp, q_seg, kv_seg = _pad(q, k, v, q_seg, kv_seg, spec)
    tq, tk = qp.shape[1], kp.shape[1]
    in_specs = [pl.BlockSpec((2,), lambda i, b, h: (0,)),
                pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((None, tk, None, dim), lambda i, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, tk, None, dim), lambda i, b, h: (b, 0, h, 0))]
    args = [meta, qp, kp, vp]
    if spec.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk),
        grid=(tq // bq, batch, heads), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
        compiler_params=_params(dim), interpret=spec.interpret, name="flash_fwd_gpu")(*args)
    return out[:, :spec.q_len], lse


def backward(q, k, v, q_seg, kv_seg, meta, out, lse, d_out, spec: Spec):
    batch, _, heads, dim = q.shape
    bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
    pq, qp, kp, vp, q_seg, kv_seg = _pad(q, k, v, q_seg, kv_seg, spec)
    dop = pq(d_out)
    delta = jnp.sum(pq(out).astype(jnp.float32) * dop.astype(jnp.float32), -1).transpose(0, 2, 1)
    tq, tk = qp.shape[1], kp.shape[1]
    args = [meta, qp, kp, vp, dop, lse, delta] + ([q_seg, kv_seg] if spec.has_segments else [])
    meta_spec = pl.BlockSpec((2,), lambda i, b, h: (0,))

    # dq: one program per query block, looping over key blocks.
    q_blk = pl.BlockSpec((None, bq, None, dim), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, tk, None, dim), lambda i, b, h: (b, 0, h, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [meta_spec, q_blk, kv_all, kv_all, q_blk, row_blk, row_blk]
    if spec.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk), grid=(tq // bq, batch, heads),
        in_specs=in_specs, out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=_params(dim), interpret=spec.interpret, name="flash_dq_gpu")(*args)

    # dk/dv: one program per key block, looping over query blocks.
    q_all = pl.BlockSpec((None, tq, None, dim), lambda j, b, h: (b, 0, h, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dim), lambda j, b, h: (b, j, h, 0))
    row_all = pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0))
    in_specs = [meta_spec, q_all, kv_blk, kv_blk, q_all, row_all, row_all]
    if spec.has_segments:
        in_specs += [pl.BlockSpec((None, tq), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec, bq=bq, bk=bk),
        grid=(tk // bk, batch, heads), in_specs=in_specs, out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype)] * 2,
        compiler_params=_params(dim), interpret=spec.interpret, name="flash_dkdv_gpu")(*args)
    return dq[:, :spec.q_len], dk[:, :spec.kv_len], dv[:, :spec.kv_len]
