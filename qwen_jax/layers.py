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


class Einsum(nn.Module):
    """A projection `einsum(equation, x, kernel)` with a logically-partitioned kernel of its
    full (multi-axis) shape, e.g. [embed, heads, head_dim], and an optional bias."""

    equation: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    config: QwenConfig
    bias_shape: tuple[int, ...] | None = None
    bias_axes: tuple[str, ...] | None = None
    # Run "btnd,ndh->bth" as "bti,ih->bth" (i = n*d; both reshapes are free). On one token
    # XLA CPU otherwise transposes the whole [n, d, h] kernel every call to match the layout
    # it picked for the tiny activation.
    merge_contracting: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp_dtype(cfg.dtype)
        kernel = self.param("kernel", nn.with_logical_partitioning(dense_init(cfg), self.axes),
                            self.shape, jnp_dtype(cfg.param_dtype))
        if self.merge_contracting:
            if self.equation != "btnd,ndh->bth":
                raise ValueError(f"merge_contracting needs 'btnd,ndh->bth', not {self.equation!r}")
            y = jnp.einsum("bti,ih->bth", x.reshape(*x.shape[:2], -1).astype(dtype),
                           kernel.reshape(-1, kernel.shape[-1]).astype(dtype),
                           precision=precision(cfg))
        else:
            y = jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype),
                           precision=precision(cfg))
        if self.bias_shape is not None:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.bias_axes),
                              self.bias_shape, jnp_dtype(cfg.param_dtype))
            y = y + bias.astype(dtype)
        return y


class MLP(nn.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))). In the release w2 is the gate, w1 the plain branch."""

    config: QwenConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, f = cfg.hidden_size, cfg.mlp_width
        gate = Einsum("bth,hf->btf", (h, f), ("embed", "mlp"), cfg, name="gate")(x)  # w2
        up = Einsum("bth,hf->btf", (h, f), ("embed", "mlp"), cfg, name="up")(x)  # w1
        act = up * nn.silu(gate)
        act = nn.with_logical_constraint(act, ("activation_batch", "activation_length",
                                               "activation_mlp"))
        return Einsum("btf,fh->bth", (f, h), ("mlp", "embed"), cfg, name="down")(act)  # c_proj
