"""RLHF losses (qwen_jax.align.losses) against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.align import losses as L

TOL = {"rtol": 1e-5, "atol": 1e-5}


def rng(seed):
    return np.random.default_rng(seed)


def ragged_mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def f32(x):
    return np.asarray(x, np.float32)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_softplus(x):  # log(1 + exp(x)) = -log_sigmoid(-x)
    x = np.asarray(x, np.float64)
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_all_axis_and_empty():
    r = rng(0)
    x = f32(r.normal(size=(4, 7)))
    mask = ragged_mask([7, 3, 1, 5], 7)
    sel = x[mask.astype(bool)].astype(np.float64)
    np.testing.assert_allclose(L.masked_mean(x, mask), sel.mean(), **TOL)
    rows = [x[i, :n].astype(np.float64).mean() for i, n in enumerate([7, 3, 1, 5])]
    np.testing.assert_allclose(L.masked_mean(x, mask, axis=1), rows, **TOL)
    # An integer / bool mask works the same.
    np.testing.assert_allclose(L.masked_mean(x, mask.astype(bool)), sel.mean(), **TOL)
    # A zero count gives 0, not NaN, both overall and per row.
    assert float(L.masked_mean(x, np.zeros_like(mask))) == 0.0
    mask2 = mask.copy()
    mask2[2] = 0
    out = np.asarray(L.masked_mean(x, mask2, axis=1))
    assert np.all(np.isfinite(out)) and out[2] == 0.0
    np.testing.assert_allclose(out[[0, 1, 3]], np.asarray(rows)[[0, 1, 3]], **TOL)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(unbiased):
    r = rng(1)
    x = f32(r.normal(1.0, 2.0, size=(3, 9)))
    mask = ragged_mask([9, 4, 2], 9)
    sel = x[mask.astype(bool)].astype(np.float64)
    np.testing.assert_allclose(L.masked_var(x, mask, unbiased=unbiased),
                               np.var(sel, ddof=1 if unbiased else 0), **TOL)


def test_masked_var_single_element_is_finite():
    x = f32([[3.0, 5.0, 7.0]])
    mask = f32([[0, 1, 0]])
    out = float(L.masked_var(x, mask, unbiased=True))
    assert math.isfinite(out) and out == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    r = rng(2)
    x = f32(r.normal(0.5, 3.0, size=(4, 6)))
    mask = ragged_mask([6, 2, 4, 5], 6)
    sel = x[mask.astype(bool)].astype(np.float64)
    mean, var = sel.mean(), np.var(sel, ddof=1)
    expect = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        expect = expect + mean
    expect = np.where(mask > 0, expect, 0.0)
    out = np.asarray(L.masked_whiten(x, mask, shift_mean=shift_mean))
    np.testing.assert_allclose(out, expect, **TOL)
    assert np.all(out[mask == 0] == 0.0)
    if shift_mean:
        vals = out[mask > 0].astype(np.float64)
        np.testing.assert_allclose([vals.mean(), np.var(vals, ddof=1)], [0.0, 1.0], **TOL)


# ---------------------------------------------------------------- reward model and DPO


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_loss_and_grad(with_margin):
    r = rng(3)
    rc, rr = f32(r.normal(size=8) * 2), f32(r.normal(size=8) * 2)
    margin = f32(r.uniform(0, 1.5, size=8)) if with_margin else None
    d = rc.astype(np.float64) - rr - (margin if with_margin else 0.0)
    out = L.pairwise_loss(rc, rr, margin)
    assert out.shape == (8,)
    np.testing.assert_allclose(out, np_softplus(-d), **TOL)
    # d/d r_chosen of sum(-log sigmoid(d)) = -sigmoid(-d)
    grad = jax.grad(lambda a: L.pairwise_loss(a, rr, margin).sum())(jnp.asarray(rc))
    np.testing.assert_allclose(grad, -np_sigmoid(-d), **TOL)


def test_pairwise_loss_margin_matters():
    a = L.pairwise_loss(f32([1.0]), f32([0.0]))
    b = L.pairwise_loss(f32([1.0]), f32([0.0]), f32([1.0]))
    np.testing.assert_allclose(a, [math.log1p(math.exp(-1.0))], **TOL)
    np.testing.assert_allclose(b, [math.log(2.0)], **TOL)


def test_dpo_loss_hand_example():
    # policy gains 0.5 nats on chosen and loses 0.5 on rejected relative to the reference.
    losses, cr, rj = L.dpo_loss(f32([-1.0]), f32([-2.0]), f32([-1.5]), f32([-1.5]), 0.1)
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-0.1))], **TOL)  # 0.64439666
    np.testing.assert_allclose(losses, [0.6443966600735709], **TOL)
    np.testing.assert_allclose(cr, [0.05], **TOL)
    np.testing.assert_allclose(rj, [-0.05], **TOL)


def test_dpo_loss_random_and_grad():
    r = rng(4)
    pc, pr, rc, rr = (f32(r.normal(-20, 4, size=6)) for _ in range(4))
    beta = 0.3
    z = beta * ((pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr))
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(losses, np_softplus(-z), **TOL)
    np.testing.assert_allclose(cr, beta * (pc.astype(np.float64) - rc), **TOL)
    np.testing.assert_allclose(rj, beta * (pr.astype(np.float64) - rr), **TOL)
    grad = jax.grad(lambda a: L.dpo_loss(a, pr, rc, rr, beta)[0].sum())(jnp.asarray(pc))
    np.testing.assert_allclose(grad, -beta * np_sigmoid(-z), **TOL)
    # The rewards carry no gradient.
    g_rew = jax.grad(lambda a: sum(v.sum() for v in L.dpo_loss(a, pr, rc, rr, beta)[1:]))(
        jnp.asarray(pc))
    np.testing.assert_array_equal(g_rew, np.zeros(6))


# ---------------------------------------------------------------- KL penalty


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl"])
def test_kl_penalty_kinds(kind):
    r = rng(5)
    logp, ref = f32(r.normal(-2, 1, size=(3, 5))), f32(r.normal(-2, 1, size=(3, 5)))
    d = logp.astype(np.float64) - ref
    expect = {"kl": d, "abs": np.abs(d), "mse": 0.5 * d * d,
              "low_var_kl": np.exp(-d) + d - 1.0}[kind]
    np.testing.assert_allclose(L.kl_penalty(logp, ref, kind), expect, **TOL)


def test_kl_penalty_default_and_unknown():
    np.testing.assert_allclose(L.kl_penalty(f32([1.0]), f32([0.25])), [0.75], **TOL)
    with pytest.raises(ValueError, match="full") as info:
        L.kl_penalty(f32([0.0]), f32([0.0]), "full")
    for name in ("kl", "abs", "mse", "low_var_kl"):
        assert name in str(info.value)


# ---------------------------------------------------------------- GAE


def np_gae(rewards, values, mask, gamma, lam):
    rewards = rewards.astype(np.float64) * mask
    values = values.astype(np.float64) * mask
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for s in reversed(range(t)):
            next_v = values[i, s + 1] if s + 1 < t else 0.0
            delta = rewards[i, s] + gamma * next_v - values[i, s]
            last = delta + gamma * lam * last
            adv[i, s] = last
    return adv * mask, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop_under_jit(gamma, lam):
    r = rng(6)
    b, t = 4, 8
    mask = ragged_mask([8, 5, 1, 3], t)
    rewards = f32(r.normal(size=(b, t)) * 0.3)
    values = f32(r.normal(size=(b, t)))  # garbage in the padding too: must be masked away
    adv_np, ret_np = np_gae(rewards, values, mask, gamma, lam)
    fn = jax.jit(lambda rw, v, m: L.gae(rw, v, m, gamma, lam))
    adv, ret = fn(rewards, values, mask)
    np.testing.assert_allclose(adv, adv_np, **TOL)
    np.testing.assert_allclose(ret, ret_np, **TOL)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
    # Eager gives the same, and the inputs are stop-gradient'ed.
    np.testing.assert_allclose(L.gae(rewards, values, mask, gamma, lam)[0], adv_np, **TOL)
    g = jax.grad(lambda v: L.gae(rewards, v, mask, gamma, lam)[0].sum())(jnp.asarray(values))
    np.testing.assert_array_equal(g, np.zeros((b, t)))


# ---------------------------------------------------------------- PPO policy and value losses


def ppo_data(seed=7, b=4, t=9):
    r = rng(seed)
    mask = ragged_mask([9, 6, 2, 7], t)[:b, :t]
    old = f32(r.normal(-2, 0.5, size=(b, t)))
    logp = f32(old + r.normal(size=(b, t)) * 0.4)  # many ratios outside [0.8, 1.2]
    adv = f32(r.normal(size=(b, t)))
    return logp, old, adv, mask


def test_policy_loss_values_and_clipping():
    logp, old, adv, mask = ppo_data()
    eps = 0.2
    m = mask > 0
    ratio = np.exp(logp.astype(np.float64) - old)
    assert np.any((ratio[m] < 1 - eps) | (ratio[m] > 1 + eps))
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - eps, 1 + eps)
    loss, frac, kl = L.policy_loss(logp, old, adv, mask, eps)
    np.testing.assert_allclose(loss, np.maximum(pg1, pg2)[m].mean(), **TOL)
    np.testing.assert_allclose(frac, (pg2 > pg1)[m].mean(), **TOL)
    np.testing.assert_allclose(kl, 0.5 * ((logp.astype(np.float64) - old) ** 2)[m].mean(), **TOL)
    assert 0.0 < float(frac) < 1.0


def test_policy_loss_grad():
    logp, old, adv, mask = ppo_data(seed=8)
    eps = 0.2
    ratio = np.exp(logp.astype(np.float64) - old)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - eps, 1 + eps)
    # Where the unclipped term is the max, d pg1 / d logp = -A ratio; the clipped one is flat.
    expect = np.where(pg1 >= pg2, -adv * ratio, 0.0) * mask / mask.sum()
    assert np.any((pg2 > pg1) & (mask > 0))
    grad = jax.grad(lambda lp: L.policy_loss(lp, old, adv, mask, eps)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(grad, expect, **TOL)


def value_data(seed=9):
    r = rng(seed)
    mask = ragged_mask([5, 8, 3], 8)
    old = f32(r.normal(size=(3, 8)))
    values = f32(old + r.normal(size=(3, 8)) * 0.4)  # some deltas beyond the clip
    returns = f32(r.normal(size=(3, 8)))
    return values, old, returns, mask


def test_value_loss_values_and_clipping():
    values, old, returns, mask = value_data()
    clip = 0.2
    m = mask > 0
    v = values.astype(np.float64)
    assert np.any(np.abs(v - old)[m] > clip)
    vc = old + np.clip(v - old, -clip, clip)
    e1, e2 = (v - returns) ** 2, (vc - returns) ** 2
    loss, frac = L.value_loss(values, old, returns, mask, clip)
    np.testing.assert_allclose(loss, 0.5 * np.maximum(e1, e2)[m].mean(), **TOL)
    np.testing.assert_allclose(frac, (e2 > e1)[m].mean(), **TOL)
    assert 0.0 < float(frac) < 1.0


def test_value_loss_grad():
    values, old, returns, mask = value_data(seed=10)
    clip = 0.2
    v = values.astype(np.float64)
    vc = old + np.clip(v - old, -clip, clip)
    e1, e2 = (v - returns) ** 2, (vc - returns) ** 2
    inside = np.abs(v - old) < clip
    g_clipped = np.where(inside, vc - returns, 0.0)
    expect = np.where(e1 >= e2, v - returns, g_clipped) * mask / mask.sum()
    grad = jax.grad(lambda x: L.value_loss(x, old, returns, mask, clip)[0])(jnp.asarray(values))
    np.testing.assert_allclose(grad, expect, **TOL)
    # Finite differences on one unclipped-branch and one clipped-branch element agree too.
    fn = jax.jit(lambda x: L.value_loss(x, old, returns, mask, clip)[0])
    h = 1e-2
    for idx in [tuple(np.argwhere((e1 > e2) & (mask > 0))[0]),
                tuple(np.argwhere((e2 > e1) & (mask > 0))[0])]:
        plus, minus = values.copy(), values.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (float(fn(plus)) - float(fn(minus))) / (2 * h)
        np.testing.assert_allclose(float(grad[idx]), fd, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- entropy


def test_entropy_from_logits():
    r = rng(11)
    logits = r.normal(size=(2, 3, 17)) * 4
    x = logits - logits.max(-1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    expect = -(p * np.log(p)).sum(-1)
    out = L.entropy_from_logits(jnp.asarray(logits, jnp.float32))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=2e-5)
    out16 = L.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16))
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(L.entropy_from_logits(np.zeros((1, 8), np.float32)),
                               [math.log(8)], **TOL)


# ---------------------------------------------------------------- running reward moments


def test_moments_merge_batches():
    r = rng(12)
    m = L.moments_init()
    assert set(m) == {"count", "mean", "var"}
    assert all(v.dtype == jnp.float32 and v.shape == () and float(v) == 0 for v in m.values())
    seen = []
    update = jax.jit(L.moments_update)
    for i, (n, lengths) in enumerate([(3, [4, 2, 1]), (2, [4, 4]), (4, [1, 3, 0, 2])]):
        x = f32(r.normal(1.5, 2.0, size=(n, 4)))
        mask = ragged_mask(lengths, 4)
        seen.append(x[mask > 0])
        m = update(m, x, mask) if i % 2 else L.moments_update(m, x, mask)
        allx = np.concatenate(seen).astype(np.float64)
        np.testing.assert_allclose(m["count"], allx.size, **TOL)
        np.testing.assert_allclose(m["mean"], np.mean(allx), **TOL)
        np.testing.assert_allclose(m["var"], np.var(allx), **TOL)
        np.testing.assert_allclose(L.moments_std(m), np.std(allx, ddof=1), **TOL)
    # Without a mask every element counts.
    x = f32(r.normal(size=5))
    m = L.moments_update(m, x)
    allx = np.concatenate(seen + [x]).astype(np.float64)
    np.testing.assert_allclose([m["count"], m["mean"], m["var"]],
                               [allx.size, np.mean(allx), np.var(allx)], **TOL)
    assert all(v.dtype == jnp.float32 for v in m.values())
    # An empty batch leaves the moments unchanged.
    m2 = L.moments_update(m, f32(r.normal(size=(2, 3))), np.zeros((2, 3), np.float32))
    for k in m:
        assert float(m2[k]) == float(m[k])
    # normalize_rewards with and without the std.
    rw = f32(r.normal(size=4))
    np.testing.assert_allclose(L.normalize_rewards(rw, m, use_std=False), rw - np.mean(allx),
                               **TOL)
    np.testing.assert_allclose(L.normalize_rewards(rw, m, use_std=True),
                               (rw - np.mean(allx)) / np.std(allx, ddof=1), **TOL)


def test_moments_std_small_count():
    m = L.moments_init()
    assert float(L.moments_std(m)) == 1.0
    m = L.moments_update(m, f32([4.0]))
    assert float(m["count"]) == 1.0 and float(m["mean"]) == 4.0
    assert float(L.moments_std(m)) == 1.0
    np.testing.assert_allclose(L.normalize_rewards(f32([5.0]), m, use_std=True), [1.0], **TOL)
