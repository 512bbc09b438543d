"""Building blocks of the Qwen v1 decoder: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.config import QwenConfig


def jnp_dtype(name: str):
    return jnp.dtype(name)


def precision(config: QwenConfig):
    return None if config.matmul_precision == "default" else config.matmul_precision


def dense_init(config: QwenConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, times the weight."""

    epsilon: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                     + self.epsilon)
        return normed.astype(x.dtype) * weight.astype(x.dtype)


def rope_cos_sin(positions, inv_freq):
    """cos/sin [B, T, rotary_dim] in float32 from positions [B, T] and inv_freq [B or 1, d/2].

    Rotate-half layout: the frequencies are repeated over the two halves of the rotary dims.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[:, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, N, D] by cos/sin [B, T, R] (R <= D, the rest passes), in float32."""
    rot = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    half = rot // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))). In the release w2 is the gate, w1 the plain branch."""

    config: QwenConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, axes, name: nn.DenseGeneral(  # noqa: E731
            features, use_bias=False, dtype=jnp_dtype(cfg.dtype),
            param_dtype=jnp_dtype(cfg.param_dtype), precision=precision(cfg),
            kernel_init=nn.with_logical_partitioning(dense_init(cfg), axes), name=name)
        gate = dense(cfg.mlp_width, ("embed", "mlp"), "gate")(x)  # w2
        up = dense(cfg.mlp_width, ("embed", "mlp"), "up")(x)  # w1
        h = up * nn.silu(gate)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length",
                                           "activation_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down")(h)  # c_proj
