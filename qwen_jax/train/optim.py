"""The report's optimizer (§2.4, Table 1): AdamW (0.9, 0.95, 1e-8), linear warmup then cosine
decay to 10% of the peak, global-norm gradient clipping, weight decay on matrices only."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_learning_rate: float = 3e-4
    warmup_steps: int = 2000
    total_steps: int = 100_000  # the cosine reaches its floor here
    final_lr_fraction: float = 0.1  # cosine decays to 10% of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}:"
                             " expected warmup >= 0 and total > 0")
        if self.peak_learning_rate <= 0 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"peak_learning_rate={self.peak_learning_rate}, final_lr_fraction="
                             f"{self.final_lr_fraction}: expected > 0 and in [0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            raise ValueError(f"b1={self.b1}, b2={self.b2}, eps={self.eps}: expected b1 and b2 "
                             "in [0, 1) and eps > 0 (AdamW's update is then finite whenever "
                             "the gradients are)")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine from peak to final_lr_fraction x peak
    at total_steps, constant after (also when warmup fills the whole run)."""
    peak = cfg.peak_learning_rate
    floor = peak * cfg.final_lr_fraction
    warmup = max(cfg.warmup_steps, 0)
    decay = max(cfg.total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def weight_decay_mask(params):
    """Decay projection kernels and embeddings; not RMSNorm weights or the QKV bias (decaying
    them pulls norms towards 0 and biases towards 0 for no regularisation benefit)."""

    def decay(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    cfg.validate()
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(learning_rate=learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)
