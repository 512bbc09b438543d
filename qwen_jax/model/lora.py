"""LoRA and Q-LoRA on the Qwen decoder.

A LoRA adapter adds `scale * (dropout(x) @ A) @ B` to a frozen projection `x @ W`, with A
[inputs, r] drawn like PEFT's (Kaiming-uniform, bound 1/sqrt(inputs)), B [r, outputs] zero (so
training starts from the base model), and scale alpha / r (rsLoRA: alpha / sqrt(r)). The
targets use the release's module names:

    c_attn        q, k and v: one adapter on the fused projection (A shared, B [r, 3, N, D])
    attn.c_proj   the attention output (our attn/o)
    mlp.c_proj    the MLP output (mlp/down); "c_proj" means both c_proj modules, as in PEFT
    w1, w2        mlp/up and mlp/gate (w2 is the SiLU branch)

The adapter parameters sit under the projection they adapt (attn/o/lora/{lora_a, lora_b}, and
likewise mlp/{down,up,gate}/lora), and at attn/c_attn_lora/{lora_a, lora_b} for c_attn. Everything
else is the base model; with `base_quant` its layer projection kernels are stored quantised
by qwix (int8: one scale per output channel; int4 / nf4: one per `base_quant_group` inputs)
as `kernel_q` + `kernel_scale` and dequantised where they are used (Q-LoRA).

`trainable` says which parameters a LoRA run trains (the adapters, and `modules_to_save`:
`wte` / `embed`, `lm_head`); `merge` folds the adapters into the kernels (W + scale A B, after
dequantising) and gives the plain model back.
"""

from __future__ import annotations

import math
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.model.config import QwenConfig

LORA_A, LORA_B = "lora_a", "lora_b"
ADAPTER = "lora"  # the adapter's module name under the projection it adapts
C_ATTN = "c_attn_lora"
QUANT_KERNEL, QUANT_SCALE = "kernel_q", "kernel_scale"
# Our module of each release target (under a layer).
TARGET_MODULES = {"c_attn": ("attn", C_ATTN), "attn.c_proj": ("attn", "o"),
                  "mlp.c_proj": ("mlp", "down"), "w1": ("mlp", "up"), "w2": ("mlp", "gate")}
# Release names of modules_to_save -> our top-level modules.
SAVED_MODULES = {"wte": "embed", "embed": "embed", "lm_head": "lm_head"}


def expand_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Release target names with "c_proj" resolved to both c_proj modules."""
    out: list[str] = []
    for t in targets:
        for name in (("attn.c_proj", "mlp.c_proj") if t == "c_proj" else (t,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def adapts(config: QwenConfig, target: str) -> bool:
    """Whether `config` puts an adapter on the release module `target`."""
    return config.lora_rank > 0 and target in expand_targets(config.lora_targets)


def scale(config: QwenConfig) -> float:
    r = config.lora_rank
    return config.lora_alpha / (math.sqrt(r) if config.lora_rslora else r)


def lora_a_init(fan_in: int):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on [r, fan_in], i.e. U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(rng, shape, dtype=jnp.float32):
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    return init


def _equations(equation: str) -> tuple[str, str]:
    """"x,kernel->y" of a projection -> the adapter's two einsums (x @ A, then @ B)."""
    inputs, out = equation.split("->")
    x, kernel = inputs.split(",")
    r = next(c for c in "rzyw" if c not in equation)
    contract = [c for c in kernel if c in x]
    outputs = [c for c in kernel if c not in x]
    lead = [c for c in x if c not in contract]
    down = f"{x},{''.join(contract)}{r}->{''.join(lead)}{r}"
    up = f"{''.join(lead)}{r},{r}{''.join(outputs)}->{out}"
    return down, up


class Adapter(nn.Module):
    """`scale * (dropout(x) @ lora_a) @ lora_b` for a projection `equation` whose kernel has
    `shape` / logical `axes` (its first `n_contract` dims are contracted)."""

    equation: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_contract: int
    config: QwenConfig
    train: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        r, c = cfg.lora_rank, self.n_contract
        pdtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        a = self.param(LORA_A, nn.with_logical_partitioning(
            lora_a_init(math.prod(self.shape[:c])), (*self.axes[:c], None)),
            (*self.shape[:c], r), pdtype)
        b = self.param(LORA_B, nn.with_logical_partitioning(
            nn.initializers.zeros, (None, *self.axes[c:])), (r, *self.shape[c:]), pdtype)
        if self.train and cfg.lora_dropout > 0:
            x = nn.Dropout(cfg.lora_dropout)(x, deterministic=False)
        down, up = _equations(self.equation)
        prec = None if cfg.matmul_precision == "default" else cfg.matmul_precision
        h = jnp.einsum(down, x.astype(dtype), a.astype(dtype), precision=prec)
        return jnp.einsum(up, h, (b * scale(cfg)).astype(dtype), precision=prec)


# ----------------------------------------------------------------------- quantised kernels
def quant_how(config: QwenConfig, n_contract: int, ndim: int, stacked: bool):
    """qwix's (qtype, channelwise axes, tiled axes) of a kernel: every axis but the last
    contracted one gets its own scales; int4 / nf4 tile that one by base_quant_group."""
    qtype = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[config.base_quant]
    off = 1 if stacked else 0
    last = off + n_contract - 1
    channelwise = tuple(i for i in range(ndim) if i != last)
    tiled = {} if config.base_quant == "int8" else {last: config.base_quant_group}
    return qtype, channelwise, tiled


def quantize_kernel(kernel, config: QwenConfig, n_contract: int, stacked: bool = False):
    """(qvalue, scale) of a float kernel."""
    import qwix

    qtype, channelwise, tiled = quant_how(config, n_contract, kernel.ndim, stacked)
    q = qwix.quantize(jnp.asarray(kernel, jnp.float32), qtype, channelwise_axes=channelwise,
                      tiled_axes=tiled)
    qvalue = q.qvalue
    if config.base_quant == "nf4":  # uint4 codes 0..15, stored as int4 (-8..7): checkpointable
        qvalue = (qvalue.astype(jnp.int8) - 8).astype(jnp.int4)
    return qvalue, q.scale


def dequantize_kernel(qvalue, scale_, config: QwenConfig):
    import qwix

    qtype = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[config.base_quant]
    if config.base_quant == "nf4":
        qvalue = (qvalue.astype(jnp.int8) + 8).astype(jnp.uint4)
    return qwix.dequantize(qwix.QArray(qvalue, scale_, None, qtype))


def attach(plain, fresh, config: QwenConfig):
    """A plain model's parameters -> a LoRA model's: the adapters of `fresh` (a LoRA model's
    `init_params`; B = 0: the same function), the layer kernels quantised if
    `config.base_quant` asks. Jit it: the random base of `fresh` is dead code then."""
    fresh, base = _flat(fresh), _flat(plain)
    out = {}
    for key, value in fresh.items():
        if _is_adapter(key):
            out[key] = value
        elif key[-1] == QUANT_KERNEL:
            w = base[key[:-1] + ("kernel",)]
            out[key], out[key[:-1] + (QUANT_SCALE,)] = quantize_kernel(
                w, config, _n_contract(key[-2]), stacked=key[0] == "layers")
        elif key[-1] != QUANT_SCALE:
            out[key] = base[key].astype(value.dtype)
    return _unflat(out)


def quant_scale_axes(axes, n_contract: int, config: QwenConfig):
    """Logical axes of a kernel's scale: the kernel's, but unsharded where int4 / nf4 group
    the inputs (that dimension is shorter by the group size)."""
    if config.base_quant == "int8":
        return tuple(axes)
    return tuple(None if i == n_contract - 1 else a for i, a in enumerate(axes))


# ----------------------------------------------------------------------- parameter trees
def _is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in (LORA_A, LORA_B)


def trainable_fn(modules_to_save: Iterable[str] = ()):
    """path (tuple of keys) -> whether a LoRA run trains that parameter."""
    saved = {SAVED_MODULES[m] for m in modules_to_save}
    return lambda path: _is_adapter(path) or path[0] in saved


def _flat(tree) -> dict[tuple[str, ...], object]:
    from flax import traverse_util
    return traverse_util.flatten_dict(tree)


def _unflat(flat):
    from flax import traverse_util
    return traverse_util.unflatten_dict(flat)


def split(params, is_trainable) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts of a parameter tree."""
    flat = _flat(params)
    train = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return _unflat(train), _unflat(frozen)


def combine(*trees) -> dict:
    """The union of disjoint parameter trees."""
    flat: dict = {}
    for t in trees:
        flat.update(_flat(t))
    return _unflat(flat)


def has_adapters(params) -> bool:
    return any(_is_adapter(k) or k[-1] == QUANT_KERNEL for k in _flat(params))


def _n_contract(module: str) -> int:
    return 2 if module == "o" else 1


def merge(params, config: QwenConfig):
    """A LoRA (or Q-LoRA) model's parameters -> the plain model's (kernels W + scale A B,
    dequantised first), as float32-computed numpy arrays, and the config without LoRA;
    stacked or per-layer layouts."""
    flat = dict(_flat(params))
    s = scale(config) if config.lora_rank else 0.0
    for key in [k for k in flat if k[-1] == QUANT_KERNEL]:
        module = key[:-1]
        w = dequantize_kernel(jnp.asarray(flat.pop(key)), jnp.asarray(flat.pop(
            module + (QUANT_SCALE,))), config)
        flat[module + ("kernel",)] = np.asarray(w, dtype=np.float32)
    for key in [k for k in flat if k[-1] == LORA_A]:
        module = key[:-1]
        a = np.asarray(flat.pop(key), np.float32)
        b = np.asarray(flat.pop(module + (LORA_B,)), np.float32)
        if module[-1] == ADAPTER:  # under the projection it adapts
            module = module[:-1]
        stacked = module[0] == "layers"
        if module[-1] == C_ATTN:
            for i, name in enumerate("qkv"):
                target = module[:-1] + (name, "kernel")
                flat[target] = _add(flat[target], a, b[..., i, :, :], 1, stacked, s)
        else:
            target = module + ("kernel",)
            flat[target] = _add(flat[target], a, b, _n_contract(module[-1]), stacked, s)
    dtype = np.dtype(config.param_dtype)
    out = {k: (v.astype(dtype) if k[-1] == "kernel" and v.dtype != dtype else v)
           for k, v in flat.items()}
    plain = config.replace(lora_rank=0, base_quant="none")
    return _unflat(out), plain


def _add(w, a, b, n_contract: int, stacked: bool, s: float):
    """w + s * a @ b with a [(L,) *contract, r], b [(L,) r, *out]."""
    w32 = np.asarray(w, np.float32)
    lead = 1 if stacked else 0
    a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = b.reshape(*b.shape[:lead + 1], -1)
    delta = np.matmul(a2, b2) * s
    return w32 + delta.reshape(w32.shape)
