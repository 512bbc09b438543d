"""FlashAttention-2 for TPU (Pallas/Mosaic): forward, dq and dk/dv kernels.

Layout inside the kernels is [B, N, T, D] (head_dim on lanes); per-query vectors (lse, delta,
segment ids) are stored lane-dense as [.., 1, T] and turned into columns once per outer block.
The grid is (batch, heads, outer block, inner block) with the inner axis sequential; the runtime
scalars (q_offset, window, per-block segment-id ranges) are scalar-prefetched into SMEM so that
the index maps clamp the inner block into the visible band: steps outside it re-use the resident
block (no DMA) and skip all compute; tiles straddling a mask edge take the masked path, the rest
run unmasked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.kernels import common
from qwen_jax.kernels.common import EMPTY_LSE, MASK_VALUE, BlockSizes, Spec

LANES = 128
# (fwd q, fwd k, bwd q, bwd k). v6e has a 256-wide MXU and a 2x bigger default scoped VMEM, so
# it takes longer key blocks; v5e/v5p (128-wide MXU) keep 512-square tiles.
GENERATION_BLOCKS = {
    "v4": BlockSizes(256, 512, 256, 256),
    "v5e": BlockSizes(512, 512, 256, 512),
    "v5p": BlockSizes(512, 512, 512, 512),
    "v6e": BlockSizes(512, 1024, 512, 512),
}
# Scoped-VMEM limits: above the per-generation defaults, well under the physical VMEM.
GENERATION_VMEM = {"v4": 32 << 20, "v5e": 64 << 20, "v5p": 48 << 20, "v6e": 64 << 20}
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
          "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def generation(device_kind: str | None = None) -> str:
    """TPU generation of the device the call is traced for ('v5e', 'v5p', 'v6e', ...)."""
    if device_kind is None:
        mesh = jax.sharding.get_abstract_mesh()
        device = None if mesh.empty else mesh.abstract_device
        if device is None:
            device = jax.config.jax_default_device or jax.devices()[0]
        device_kind = device.device_kind
    return _KINDS.get(device_kind, "v5p")


def default_block_sizes(gen: str) -> BlockSizes:
    return GENERATION_BLOCKS.get(gen, GENERATION_BLOCKS["v5p"])


def _dot(a, b, contract_a: int, contract_b: int):
    # Explicit either way: a global 'highest' default would ask Mosaic for fp32 bf16 matmuls.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _column(row):
    """(1, n) -> (n, 1) through an aligned (LANES, n) transpose (Mosaic-friendly)."""
    return jnp.broadcast_to(row, (LANES, row.shape[1])).T[:, :1]


def _row(col):
    return jnp.broadcast_to(col, (col.shape[0], LANES)).T[:1, :]


def _segment_vis(pref_ref, b, qi, ki, batch, nq, nk):
    """Block (run, full) from the segment-id ranges scalar-prefetched after [q_offset, window]."""
    q_base, k_base = 2, 2 + 2 * batch * nq
    q_min = pref_ref[q_base + b * nq + qi]
    q_max = pref_ref[q_base + batch * nq + b * nq + qi]
    k_min = pref_ref[k_base + b * nk + ki]
    k_max = pref_ref[k_base + batch * nk + b * nk + ki]
    return common.segment_visibility(q_min, q_max, k_min, k_max)


def _visibility(pref_ref, b, qi, ki, bq, bk, batch, nq, nk, spec):
    meta = (pref_ref[0], pref_ref[1])
    run, full = common.block_visibility(qi * bq, bq, ki * bk, bk, meta, spec)
    if spec.has_segments:
        seg_run, seg_full = _segment_vis(pref_ref, b, qi, ki, batch, nq, nk)
        run, full = run & seg_run, full & seg_full
    return meta, run, full


def _branches(run, full, step):
    """Unmasked step where the whole tile is visible, masked where it straddles an edge."""
    pl.when(run & full)(functools.partial(step, False))
    pl.when(run & jnp.logical_not(full))(functools.partial(step, True))


def _fwd_kernel(pref_ref, q_ref, k_ref, v_ref, *refs, spec, bq, bk, batch, nq, nk):
    if spec.has_segments:
        qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, qseg_sc = refs
    else:
        o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if spec.has_segments:
            qseg_sc[...] = _column(qseg_ref[...])

    meta, run, full = _visibility(pref_ref, b, qi, ki, bq, bk, batch, nq, nk, spec)

    def step(masked):
        v = v_ref[...]
        s = _dot(q_ref[...], k_ref[...], 1, 1) * spec.scale
        if masked:
            q_idx = qi * bq + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            k_idx = ki * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            segs = (qseg_sc[...], kvseg_ref[...]) if spec.has_segments else (None, None)
            mask = common.element_mask(q_idx, k_idx, meta, spec, *segs)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:  # a row with nothing visible yet has m_new == MASK_VALUE: exp(0) there
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, 1, 0)
        m_sc[...] = m_new

    _branches(run, full, step)

    @pl.when(ki == nk - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _row(jnp.where(empty, EMPTY_LSE, m_sc[...] + jnp.log(l)))


def _dq_kernel(pref_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, bq, bk,
               batch, nq, nk):
    if spec.has_segments:
        qseg_ref, kvseg_ref, dq_ref, dq_sc, lse_sc, delta_sc, qseg_sc = refs
    else:
        dq_ref, dq_sc, lse_sc, delta_sc = refs
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        lse_sc[...] = _column(lse_ref[...])
        delta_sc[...] = _column(delta_ref[...])
        if spec.has_segments:
            qseg_sc[...] = _column(qseg_ref[...])

    meta, run, full = _visibility(pref_ref, b, qi, ki, bq, bk, batch, nq, nk, spec)

    def step(masked):
        k = k_ref[...]
        s = _dot(q_ref[...], k, 1, 1) * spec.scale
        p = jnp.exp(s - lse_sc[...])
        if masked:
            q_idx = qi * bq + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            k_idx = ki * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            segs = (qseg_sc[...], kvseg_ref[...]) if spec.has_segments else (None, None)
            p = jnp.where(common.element_mask(q_idx, k_idx, meta, spec, *segs), p, 0.0)
        dp = _dot(do_ref[...], v_ref[...], 1, 1)
        ds = p * (dp - delta_sc[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

    _branches(run, full, step)

    @pl.when(ki == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * spec.scale).astype(dq_ref.dtype)


def _dkdv_kernel(pref_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, bq, bk,
                 batch, nq, nk):
    """Transposed tiles (keys on sublanes, queries on lanes) so lse/delta rows broadcast as-is
    and dv = p^T do, dk = ds^T q are plain matmuls."""
    if spec.has_segments:
        qseg_ref, kvseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, kvseg_sc = refs
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = refs
    b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        if spec.has_segments:
            kvseg_sc[...] = _column(kvseg_ref[...])

    meta, run, full = _visibility(pref_ref, b, qi, ki, bq, bk, batch, nq, nk, spec)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s_t = _dot(k_ref[...], q, 1, 1) * spec.scale
        p_t = jnp.exp(s_t - lse_ref[...])
        if masked:
            k_idx = ki * bk + lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
            q_idx = qi * bq + lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
            segs = (qseg_ref[...], kvseg_sc[...]) if spec.has_segments else (None, None)
            p_t = jnp.where(common.element_mask(q_idx, k_idx, meta, spec, *segs), p_t, 0.0)
        dv_sc[...] += _dot(p_t.astype(do.dtype), do, 1, 0)
        dp_t = _dot(v_ref[...], do, 1, 1)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q, 1, 0)

    _branches(run, full, step)

    @pl.when(qi == nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _prefetch(meta, q_seg, kv_seg, bq, bk):
    if q_seg is None:
        return meta
    q_min, q_max = common.segment_ranges(q_seg, bq)
    k_min, k_max = common.segment_ranges(kv_seg, bk)
    return jnp.concatenate([meta, q_min.ravel(), q_max.ravel(), k_min.ravel(), k_max.ravel()])


def _prepare(q, k, v, q_seg, kv_seg, spec):
    """[B, T, N, D] -> padded [B, N, T, D]; segment ids -> padded [B, T] (edge-padded)."""
    tq = lambda x: common.pad_axis(x.transpose(0, 2, 1, 3), 2, spec.blocks.q_multiple)  # noqa
    tk = lambda x: common.pad_axis(x.transpose(0, 2, 1, 3), 2, spec.blocks.k_multiple)  # noqa
    if spec.has_segments:
        q_seg = common.pad_axis(q_seg.astype(jnp.int32), 1, spec.blocks.q_multiple, "edge")
        kv_seg = common.pad_axis(kv_seg.astype(jnp.int32), 1, spec.blocks.k_multiple, "edge")
    return tq, tk, tq(q), tk(k), tk(v), q_seg, kv_seg


# Matmuls of head_dim per visible (query, key) pair in each kernel, each a multiply-add (2
# FLOPs): forward q.k and p.v; dq recomputes q.k, then do.v and ds.k; dk/dv recomputes q.k,
# then p.do, do.v and ds.q.
_MATMULS = {"flash_fwd_tpu": 2, "flash_dq_tpu": 3, "flash_dkdv_tpu": 4}


def _cost(spec, batch: int, heads: int, dim: int, name: str, args, out_shape):
    """What a call computes, for XLA's cost analysis (a custom call is opaque to it): the
    visible pairs of a causal call taken as q_len (kv_len + 1) / 2, every pair otherwise (a
    runtime window or segments make it less); bytes: every operand and result once."""
    pairs = spec.q_len * ((spec.kv_len + 1) / 2 if spec.causal else spec.kv_len)
    outs = jax.tree_util.tree_leaves(out_shape)
    nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in [*args, *outs])
    return pl.CostEstimate(flops=int(2 * _MATMULS[name] * batch * heads * pairs * dim),
                           transcendentals=int(batch * heads * pairs), bytes_accessed=int(nbytes))


def _call(kernel, spec, grid, in_specs, out_specs, out_shape, scratch, args, name):
    gen = dict(spec.options).get("generation", "v5p")
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=GENERATION_VMEM.get(gen))
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    batch, heads, _, dim = args[1].shape
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          compiler_params=params, interpret=spec.interpret, name=name,
                          cost_estimate=_cost(spec, batch, heads, dim, name, args, out_shape)
                          )(*args)


def _block(*shape):
    return functools.partial(pl.BlockSpec, shape)


def forward(q, k, v, q_seg, kv_seg, meta, spec: Spec):
    batch, _, heads, dim = q.shape
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    _, _, qt, kt, vt, q_seg, kv_seg = _prepare(q, k, v, q_seg, kv_seg, spec)
    nq, nk = qt.shape[2] // bq, kt.shape[2] // bk

    def kv_index(qi, ki, pref):
        lo, hi = common.kv_block_range(qi, bq, bk, (pref[0], pref[1]), spec)
        return jnp.minimum(jnp.maximum(ki, lo), hi)

    in_specs = [_block(None, None, bq, dim)(lambda b, h, i, j, p: (b, h, i, 0)),
                _block(None, None, bk, dim)(lambda b, h, i, j, p: (b, h, kv_index(i, j, p), 0)),
                _block(None, None, bk, dim)(lambda b, h, i, j, p: (b, h, kv_index(i, j, p), 0))]
    args = [_prefetch(meta, q_seg, kv_seg, bq, bk), qt, kt, vt]
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, dim), jnp.float32)]
    if spec.has_segments:
        in_specs += [_block(None, 1, bq)(lambda b, h, i, j, p: (b, 0, i)),
                     _block(None, 1, bk)(lambda b, h, i, j, p: (b, 0, kv_index(i, j, p)))]
        args += [q_seg[:, None], kv_seg[:, None]]
        scratch.append(pltpu.VMEM((bq, 1), jnp.int32))
    out_specs = [_block(None, None, bq, dim)(lambda b, h, i, j, p: (b, h, i, 0)),
                 _block(None, None, 1, bq)(lambda b, h, i, j, p: (b, h, 0, i))]
    out_shape = [jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, 1, qt.shape[2]), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, batch=batch, nq=nq, nk=nk)
    out, lse = _call(kernel, spec, (batch, heads, nq, nk), in_specs, out_specs, out_shape,
                     scratch, args, "flash_fwd_tpu")
    return out[:, :, :spec.q_len].transpose(0, 2, 1, 3), lse


def backward(q, k, v, q_seg, kv_seg, meta, out, lse, d_out, spec: Spec):
    batch, _, heads, dim = q.shape
    bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
    tq, _, qt, kt, vt, q_seg, kv_seg = _prepare(q, k, v, q_seg, kv_seg, spec)
    dot = tq(d_out)
    delta = jnp.sum(tq(out).astype(jnp.float32) * dot.astype(jnp.float32), axis=-1)[:, :, None]
    nq, nk = qt.shape[2] // bq, kt.shape[2] // bk
    pref = _prefetch(meta, q_seg, kv_seg, bq, bk)
    seg_args = [q_seg[:, None], kv_seg[:, None]] if spec.has_segments else []
    statics = dict(spec=spec, bq=bq, bk=bk, batch=batch, nq=nq, nk=nk)

    # dq: grid over (query block, key block), keys innermost and clamped to the visible band.
    def kv_index(qi, ki, p):
        lo, hi = common.kv_block_range(qi, bq, bk, (p[0], p[1]), spec)
        return jnp.minimum(jnp.maximum(ki, lo), hi)

    q_spec = _block(None, None, bq, dim)(lambda b, h, i, j, p: (b, h, i, 0))
    row_spec = _block(None, None, 1, bq)(lambda b, h, i, j, p: (b, h, 0, i))
    kv_spec = _block(None, None, bk, dim)(lambda b, h, i, j, p: (b, h, kv_index(i, j, p), 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    scratch = [pltpu.VMEM((bq, dim), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, 1), jnp.float32)]
    if spec.has_segments:
        in_specs += [_block(None, 1, bq)(lambda b, h, i, j, p: (b, 0, i)),
                     _block(None, 1, bk)(lambda b, h, i, j, p: (b, 0, kv_index(i, j, p)))]
        scratch.append(pltpu.VMEM((bq, 1), jnp.int32))
    dq = _call(functools.partial(_dq_kernel, **statics), spec, (batch, heads, nq, nk), in_specs,
               q_spec, jax.ShapeDtypeStruct(qt.shape, q.dtype), scratch,
               [pref, qt, kt, vt, dot, lse, delta, *seg_args], "flash_dq_tpu")

    # dk/dv: grid over (key block, query block), queries innermost and clamped likewise.
    def q_index(ki, qi, p):
        lo, hi = common.q_block_range(ki, bq, bk, (p[0], p[1]), spec)
        return jnp.minimum(jnp.maximum(qi, lo), hi)

    q_spec = _block(None, None, bq, dim)(lambda b, h, j, i, p: (b, h, q_index(j, i, p), 0))
    row_spec = _block(None, None, 1, bq)(lambda b, h, j, i, p: (b, h, 0, q_index(j, i, p)))
    kv_spec = _block(None, None, bk, dim)(lambda b, h, j, i, p: (b, h, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    scratch = [pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)]
    if spec.has_segments:
        in_specs += [_block(None, 1, bq)(lambda b, h, j, i, p: (b, 0, q_index(j, i, p))),
                     _block(None, 1, bk)(lambda b, h, j, i, p: (b, 0, j))]
        scratch.append(pltpu.VMEM((bk, 1), jnp.int32))
    dk, dv = _call(functools.partial(_dkdv_kernel, **statics), spec, (batch, heads, nk, nq),
                   in_specs, [kv_spec, kv_spec],
                   [jax.ShapeDtypeStruct(kt.shape, k.dtype)] * 2, scratch,
                   [pref, qt, kt, vt, dot, lse, delta, *seg_args], "flash_dkdv_tpu")
    untq = lambda x, n: x[:, :, :n].transpose(0, 2, 1, 3)  # noqa: E731
    return untq(dq, spec.q_len), untq(dk, spec.kv_len), untq(dv, spec.kv_len)
