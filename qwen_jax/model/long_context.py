"""Training-free long-context techniques of report §2.5, with the released code's semantics.

- Dynamic NTK-aware interpolation: for a forward over L tokens with trained length S,
  alpha = max(2^ceil(log2(L/S) + 1) - 1, 1) and the RoPE base becomes base * alpha^(d/(d-2)).
- LogN-Scaling: the query at 0-based position p is multiplied by ln(p+1)/ln(S) when p+1 > S.
- Layer-wise window attention: the per-layer window sizes live in the config and reach
  `attention(..., window=)`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# alpha = 2^(n+1) - 1 where n counts the doublings of S that L exceeds; 2^30 x S is far beyond
# any context length this code will see.
MAX_NTK_DOUBLINGS = 30


def dynamic_ntk_level(length, seq_length: int):
    """Integer n with alpha = 2^(n+1) - 1, from the number of real tokens `length`.

    alpha = max(2^ceil(log2(L/S)+1) - 1, 1) equals 1 + sum_j 2^(j+1) [L > S 2^j]; counting in
    integers keeps it exact at the powers of two where float log2 could round either way.
    """
    length = jnp.asarray(length, jnp.int32)
    thresholds = seq_length * (2 ** np.arange(MAX_NTK_DOUBLINGS, dtype=np.int64))
    thresholds = jnp.asarray(np.minimum(thresholds, np.iinfo(np.int32).max), jnp.int32)
    return jnp.sum(length[..., None] > thresholds, axis=-1).astype(jnp.int32)


def ntk_alpha_from_level(level):
    return (2.0 ** (jnp.asarray(level, jnp.float32) + 1.0)) - 1.0


def dynamic_ntk_alpha(length, seq_length: int):
    """The dynamic NTK alpha of a forward over `length` real tokens (1 within the trained
    length)."""
    return ntk_alpha_from_level(dynamic_ntk_level(length, seq_length))


def _inv_freq_table(base: float, rotary_dim: int) -> np.ndarray:
    """inv_freq for every NTK level, computed in float64 and rounded once to float32."""
    alphas = 2.0 ** (np.arange(MAX_NTK_DOUBLINGS + 1, dtype=np.float64) + 1.0) - 1.0
    bases = base * alphas ** (rotary_dim / (rotary_dim - 2))
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return (1.0 / (bases[:, None] ** exponents[None, :])).astype(np.float32)


def rope_inv_freq(base: float, rotary_dim: int, ntk_level=None):
    """RoPE inverse frequencies [..., rotary_dim/2] in float32, with the NTK-scaled base.

    ntk_level: None (alpha 1) or an int array of any batch shape.
    """
    table = _inv_freq_table(float(base), rotary_dim)
    if ntk_level is None:
        return jnp.asarray(table[0])
    return jnp.asarray(table)[jnp.asarray(ntk_level, jnp.int32)]


def logn_scale(positions, seq_length: int):
    """Per-query LogN factor ln(p+1)/ln(S) for p+1 > S, else 1 (float32, shape of positions)."""
    n = jnp.asarray(positions, jnp.float32) + 1.0
    scale = jnp.log(n) / np.float32(np.log(seq_length))
    return jnp.where(n > seq_length, scale, 1.0).astype(jnp.float32)
