"""Pallas kernels. `flash_attention` is the TPU (Mosaic) or GPU (Triton) FlashAttention-2 with
the semantics of `qwen_jax.attention.attention`; on CPU the same kernels run interpreted."""

from __future__ import annotations

from qwen_jax.kernels import common, flash_attention_gpu, flash_attention_tpu
from qwen_jax.kernels.common import BlockSizes

BACKENDS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}
_MIN_BLOCK = {"tpu": 128, "gpu": 16}


def flash_attention(q, k, v, *, causal: bool = True, window=None, q_segment_ids=None,
                    kv_segment_ids=None, q_offset=0, scale: float | None = None,
                    backend: str = "tpu", block_sizes: BlockSizes | None = None,
                    interpret: bool = False, tpu_generation: str | None = None):
    """q [B, Tq, N, D], k/v [B, Tk, N, D] -> [B, Tq, N, D]; differentiable in q, k, v.

    `window` and `q_offset` may be traced int32 scalars. `block_sizes` defaults per backend
    (per TPU generation) and shrinks to short sequences; interpreted runs may use any blocks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention backend {backend!r}: expected one of {list(BACKENDS)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    _, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    options = ()
    if backend == "tpu":
        generation = tpu_generation or flash_attention_tpu.generation()
        options = (("generation", generation),)
        default = flash_attention_tpu.default_block_sizes(generation)
    else:
        default = flash_attention_gpu.default_block_sizes()
    if block_sizes is None:
        block_sizes = default.fit(q_len, kv_len, _MIN_BLOCK[backend],
                                  power_of_two=backend == "gpu")
    spec = common.Spec(causal=bool(causal), q_len=q_len, kv_len=kv_len,
                       scale=float(head_dim ** -0.5 if scale is None else scale),
                       has_segments=q_segment_ids is not None, blocks=block_sizes,
                       interpret=bool(interpret), options=options)
    meta = common.make_meta(q_offset, window)
    return common.flash_attention(BACKENDS[backend], spec, q, k, v, q_segment_ids,
                                  kv_segment_ids, meta)


__all__ = ["BACKENDS", "BlockSizes", "flash_attention"]
