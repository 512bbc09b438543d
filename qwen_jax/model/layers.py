"""Building blocks of the Qwen v1 decoder: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_jax.model import lora
from qwen_jax.model.config import QwenConfig
from qwen_jax.parallel.sharding import target_platform


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
    """Rotate x [B, T, N, D] by cos/sin [B, T, R] (R <= D, the rest passes), in float32.

    The rotation's arithmetic is float32 (x * cos + rotate_half(x) * sin), as in the original;
    its slicing and negation run in x's dtype, where they are exact, so no float32 copy of x
    or of its halves is ever stored (on TPU they were separate fusions, a fifth of a layer's
    memory traffic). The gradient is the same rotation by -sin (cos/sin repeat over the two
    halves, so rotate_half's transpose is minus itself), float32 inside, rounded once.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return _rope(x, cos, sin)
    return jnp.concatenate([_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_math(x, cos, sin):
    out = (x.astype(jnp.float32) * cos[:, :, None, :]
           + _rotate_half(x).astype(jnp.float32) * sin[:, :, None, :])
    return out.astype(x.dtype)


@jax.custom_vjp
def _rope(x, cos, sin):
    return _rope_math(x, cos, sin)


def _rope_fwd(x, cos, sin):
    return _rope_math(x, cos, sin), (x, cos, sin)


def _rope_bwd(res, g):
    x, cos, sin = res
    g32 = g.astype(jnp.float32)
    dcos = jnp.sum(g32 * x.astype(jnp.float32), axis=2)
    dsin = jnp.sum(g32 * _rotate_half(x).astype(jnp.float32), axis=2)
    return _rope_math(g, cos, -sin), dcos.astype(cos.dtype), dsin.astype(sin.dtype)


_rope.defvjp(_rope_fwd, _rope_bwd)


def accumulate_in_f32(dtype) -> bool:
    """Whether projections in `dtype` take the einsum_f32_accumulate path: half-precision
    compute traced for CPU (TPU and GPU round their float32 accumulators in the dot itself)."""
    return jnp.dtype(dtype).itemsize < 4 and target_platform() == "cpu"


def einsum_f32_accumulate(equation: str, x, kernel, dtype, precision=None):
    """`einsum(equation, x, kernel)` in `dtype` for a dense projection ("x = [*lead, *c],
    kernel = [*c, *out] -> [*lead, *out]", e.g. "bth,hnd->btnd"), with its matmuls and those
    of its gradient run as 2-D dots with float32 outputs (`preferred_element_type`), rounded
    to `dtype` afterwards.

    Values are those of the plain einsum (the products accumulate in float32 either way),
    except the kernel's gradient, which stays float32 instead of passing through `dtype`.
    What changes is speed on CPU: XLA CPU hands a bfloat16 x bfloat16 -> float32 dot to its
    bf16 kernels (about twice float32's FLOP/s here) only when the left operand is row-major
    and contracts its last dimension; any other bf16 dot, a bf16 result included, is upcast
    and runs at float32 speed. So the kernel gradient, x^T g, contracts a transposed copy of x
    made with a real (not layout-only) transpose. `x` is cast to `dtype`; `kernel` (e.g.
    float32 master weights) is cast inside and its gradient has its dtype.
    """
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    n_contract = len(set(lhs) & set(rhs))
    lead, contract = lhs[:len(lhs) - n_contract], lhs[len(lhs) - n_contract:]
    kept = rhs[n_contract:]
    if rhs[:n_contract] != contract or out != lead + kept or set(lead) & set(kept):
        raise ValueError(f"einsum_f32_accumulate: {equation!r} is not a dense projection; "
                         "expected 'x = [*lead, *c], kernel = [*c, *out] -> [*lead, *out]'")
    return _dense_f32(n_contract, jnp.dtype(dtype), precision, x.astype(dtype), kernel)


def dot32(a, b, contract, precision):
    """2-D a [m, k] with b [k, n] (contract=0) or b [n, k] (contract=1), float32 out."""
    return jax.lax.dot_general(a, b, (((1,), (contract,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _as_matrix(a, n_front: int):
    return a.reshape(math.prod(a.shape[:n_front]), math.prod(a.shape[n_front:]))


def transposed_copy(a):
    """a.T materialized row-major. A plain transpose is only a layout change in XLA, which
    a dot then reads as a column-major operand; through a trailing unit axis it is a copy."""
    return jnp.transpose(a[:, :, None], (1, 0, 2)).reshape(a.shape[1], a.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dense_f32(n_contract, dtype, precision, x, kernel):
    n_lead = x.ndim - n_contract
    y = dot32(_as_matrix(x, n_lead), _as_matrix(kernel.astype(dtype), n_contract), 0, precision)
    return y.astype(dtype).reshape(*x.shape[:n_lead], *kernel.shape[n_contract:])


def _dense_f32_fwd(n_contract, dtype, precision, x, kernel):
    return _dense_f32(n_contract, dtype, precision, x, kernel), (x, kernel)


def _dense_f32_bwd(n_contract, dtype, precision, residuals, g):
    x, kernel = residuals
    n_lead = x.ndim - n_contract
    g2 = _as_matrix(g, n_lead)  # [lead, out], in dtype like the output
    k2 = _as_matrix(kernel.astype(dtype), n_contract)  # [c, out]
    dx = dot32(g2, k2, 1, precision).astype(x.dtype).reshape(x.shape)
    x2t = transposed_copy(_as_matrix(x, n_lead))  # [c, lead]
    dkernel = dot32(x2t, g2, 0, precision).astype(kernel.dtype).reshape(kernel.shape)
    return dx, dkernel


_dense_f32.defvjp(_dense_f32_fwd, _dense_f32_bwd)


class Einsum(nn.Module):
    """A projection `einsum(equation, x, kernel)` with a logically-partitioned kernel of its
    full (multi-axis) shape, e.g. [embed, heads, head_dim], and an optional bias.

    `target` names a decoder-layer projection by the release's module name ("c_attn",
    "attn.c_proj", "mlp.c_proj", "w1", "w2"): such a kernel is stored quantised when the
    config asks for it, and gets a LoRA adapter when the config targets it (c_attn's adapter
    is the attention's, shared by q, k and v). See qwen_jax.model.lora."""

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
    target: str | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = jnp_dtype(cfg.dtype)
        x_letters = self.equation.split(",")[0]
        n_contract = sum(c in x_letters for c in self.equation.split(",")[1].split("->")[0])
        if self.target is not None and cfg.base_quant != "none":
            def quantized(part):
                def init(rng, shape):
                    w = dense_init(cfg)(rng, shape, jnp.float32)
                    return lora.quantize_kernel(w, cfg, n_contract)[part]
                return init

            qvalue = self.param(lora.QUANT_KERNEL, nn.with_logical_partitioning(
                quantized(0), self.axes), self.shape)
            scale = self.param(lora.QUANT_SCALE, nn.with_logical_partitioning(
                quantized(1), lora.quant_scale_axes(self.axes, n_contract, cfg)), self.shape)
            kernel = lora.dequantize_kernel(qvalue, scale, cfg).astype(dtype)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(dense_init(cfg),
                                                                        self.axes),
                                self.shape, jnp_dtype(cfg.param_dtype))
        equation = self.equation
        x_in = x
        if self.merge_contracting:
            if equation != "btnd,ndh->bth":
                raise ValueError(f"merge_contracting needs 'btnd,ndh->bth', not {equation!r}")
            equation = "bti,ih->bth"
            x, kernel = x.reshape(*x.shape[:2], -1), kernel.reshape(-1, kernel.shape[-1])
        if accumulate_in_f32(dtype):
            y = einsum_f32_accumulate(equation, x, kernel, dtype, precision(cfg))
        else:
            y = jnp.einsum(equation, x.astype(dtype), kernel.astype(dtype),
                           precision=precision(cfg))
        if self.target not in (None, "c_attn") and lora.adapts(cfg, self.target):
            y = y + lora.Adapter(self.equation, self.shape, self.axes, n_contract, cfg,
                                 self.train, name=lora.ADAPTER)(x_in).astype(y.dtype)
        if self.bias_shape is not None:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.bias_axes),
                              self.bias_shape, jnp_dtype(cfg.param_dtype))
            y = y + bias.astype(dtype)
        return y


class MLP(nn.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))). In the release w2 is the gate, w1 the plain branch."""

    config: QwenConfig
    train: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, train = self.config, self.train
        h, f = cfg.hidden_size, cfg.mlp_width
        gate = Einsum("bth,hf->btf", (h, f), ("embed", "mlp"), cfg, target="w2", train=train,
                      name="gate")(x)
        up = Einsum("bth,hf->btf", (h, f), ("embed", "mlp"), cfg, target="w1", train=train,
                    name="up")(x)
        act = up * nn.silu(gate)
        act = nn.with_logical_constraint(act, ("activation_batch", "activation_length",
                                               "activation_mlp"))
        return Einsum("btf,fh->bth", (f, h), ("mlp", "embed"), cfg, target="mlp.c_proj",
                      train=train, name="down")(act)
