"""RLHF losses of the Qwen report §3.2: the reward-model, PPO and DPO objectives.

Pure `jax.numpy` functions following InstructGPT and TRL's PPO and DPO formulas: masked
statistics, the Bradley-Terry pairwise loss, DPO, KL penalties, GAE, the clipped policy and
value losses, the entropy and running reward moments. Masks are 0/1 arrays of any dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / sum(mask) over `axis` (None = all); a zero count gives 0."""
    mask = _f32(mask)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)), axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1e-30), 0.0)


def masked_var(x, mask, unbiased=True):
    """mean((x - mean)^2 over masked elements), times n / (n - 1) if unbiased (n = sum(mask))."""
    mask = _f32(mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)))
        var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1.0), var)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) * rsqrt(var + 1e-8) (masked mean, unbiased masked var); + mean if not
    shift_mean. Masked-out positions are 0."""
    mask = _f32(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def pairwise_loss(r_chosen, r_rejected, margin=None):
    """Bradley-Terry reward-model loss per pair: -log_sigmoid(r_chosen - r_rejected - margin)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO on sequence log-probs [B]: -log_sigmoid(beta * ((pc - rc) - (pr - rr))).

    Returns (losses, chosen_rewards = beta * (pc - rc), rejected_rewards = beta * (pr - rr)),
    the rewards under stop_gradient.
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    losses = -jax.nn.log_sigmoid(beta * (chosen - rejected))
    return (losses, jax.lax.stop_gradient(beta * chosen),
            jax.lax.stop_gradient(beta * rejected))


_KL_KINDS = ("kl", "abs", "mse", "low_var_kl")


def kl_penalty(logp, ref_logp, kind="kl"):
    """Per-token KL estimate: kl = logp - ref; abs = |logp - ref|; mse = 0.5 (logp - ref)^2;
    low_var_kl (k3) = exp(ref - logp) - (ref - logp) - 1."""
    if kind == "kl":
        return logp - ref_logp
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    if kind == "mse":
        return 0.5 * jnp.square(logp - ref_logp)
    if kind == "low_var_kl":
        d = ref_logp - logp
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"unknown kl kind {kind!r}; choose one of {', '.join(_KL_KINDS)}")


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over [B, T] (valid tokens a prefix of each row).

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last position = 0),
    A_t = delta_t + gamma lam A_{t+1}; returns (A, A + V), both masked.
    """
    mask = _f32(mask)
    rewards = jax.lax.stop_gradient(rewards) * mask
    values = jax.lax.stop_gradient(values) * mask

    def step(carry, xs):
        next_value, next_adv = carry
        r, v = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        return (v, adv), adv

    zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T), reverse=True)
    advantages = adv.T * mask
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logp, old_logp, advantages, mask, clip_eps):
    """PPO clipped surrogate: ratio = exp(logp - old); pg1 = -A ratio;
    pg2 = -A clip(ratio, 1 - eps, 1 + eps); loss = masked_mean(max(pg1, pg2)).

    Returns (loss, clip_fraction = masked_mean(pg2 > pg1),
    approx_kl = 0.5 masked_mean((logp - old)^2)).
    """
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(pg1, pg2), mask)
    clip_fraction = masked_mean(_f32(pg2 > pg1), mask)
    approx_kl = 0.5 * masked_mean(jnp.square(log_ratio), mask)
    return loss, clip_fraction, approx_kl


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss: v_c = old + clip(values - old, -clip, clip);
    loss = 0.5 masked_mean(max((values - R)^2, (v_c - R)^2)).

    Returns (loss, clip_fraction = masked_mean((v_c - R)^2 > (values - R)^2)).
    """
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    err1 = jnp.square(values - returns)
    err2 = jnp.square(v_clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err1, err2), mask)
    clip_fraction = masked_mean(_f32(err2 > err1), mask)
    return loss, clip_fraction


def entropy_from_logits(logits):
    """Per-position entropy: logsumexp(l) - sum(softmax(l) * l) over the last axis, float32."""
    logits = _f32(logits)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(
        jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def moments_init():
    """Running reward statistics: dict(count=0, mean=0, var=0) as float32 scalars."""
    zero = jnp.zeros((), jnp.float32)
    return {"count": zero, "mean": zero, "var": zero}


def moments_update(moments, x, mask=None):
    """Merge a batch (masked elements, population variance) by Chan's parallel formula:
    mean' = mean + delta n / (count + n);
    var' = (var count + bvar n + delta^2 count n / (count + n)) / (count + n).
    A batch with n = 0 leaves the moments unchanged."""
    x = _f32(x)
    mask = jnp.ones_like(x) if mask is None else jnp.broadcast_to(_f32(mask), x.shape)
    n = jnp.sum(mask)
    bmean = masked_mean(x, mask)
    bvar = masked_mean(jnp.square(x - bmean), mask)
    count, mean, var = moments["count"], moments["mean"], moments["var"]
    total = count + n
    safe_total = jnp.maximum(total, 1.0)
    delta = bmean - mean
    new_mean = mean + delta * n / safe_total
    new_var = (var * count + bvar * n + jnp.square(delta) * count * n / safe_total) / safe_total
    keep = n <= 0
    return {"count": jnp.where(keep, count, total).astype(jnp.float32),
            "mean": jnp.where(keep, mean, new_mean).astype(jnp.float32),
            "var": jnp.where(keep, var, new_var).astype(jnp.float32)}


def moments_std(moments):
    """Unbiased std sqrt(var count / (count - 1)); 1.0 when count <= 1."""
    count, var = moments["count"], moments["var"]
    return jnp.where(count > 1, jnp.sqrt(var * count / jnp.maximum(count - 1, 1.0)), 1.0)


def normalize_rewards(x, moments, use_std):
    """(x - mean) / (std if use_std else 1)."""
    out = x - moments["mean"]
    return out / moments_std(moments) if use_std else out
