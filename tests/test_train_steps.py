"""Training steps: sharded equals single-device, accumulation, schedule, AdamW, MFU table."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model.config import QwenConfig, preset
from qwen_jax.parallel import sharding
from qwen_jax.train import flops
from qwen_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from qwen_jax.train.steps import Trainer, checked_update

CFG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
                 intermediate_size=256, seq_length=32, vocab_size=256, initializer_range=0.1,
                 max_position_embeddings=256, dtype="float32", param_dtype="float32",
                 matmul_precision="highest", attention_impl="xla")
# eps 1e-3 instead of the recipe's 1e-8 for the equality tests. Adam's update g/(|g|+eps) has
# sensitivity lr*eps/(|g|+eps)^2 to its gradient: for a gradient that cancels to ~1e-7 (seen
# here on embedding rows), a 1e-9 difference in float32 reduction order between meshes becomes
# a 1e-4 difference in the parameter. The gradients themselves agree to ~1e-9.
OPT = OptimizerConfig(peak_learning_rate=1e-2, warmup_steps=0, total_steps=10, eps=1e-3)


def make_batch(batch=8, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (batch, seq + 1))
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "loss_mask": (rng.random((batch, seq)) > 0.2).astype(np.float32)}


def run_steps(shape, microbatches=1, steps=2, opt=OPT):
    mesh = sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    trainer = Trainer(CFG, opt, mesh, microbatches=microbatches)
    state = trainer.init_state(jax.random.PRNGKey(0))
    step = trainer.jit_train_step()
    losses = []
    for i in range(steps):
        state, metrics = step(state, make_batch(seed=i), jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses, metrics


def assert_trees_close(a, b, atol):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0),
        a, b)


@pytest.fixture(scope="module")
def single_device():
    return run_steps((1, 1, 1))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(single_device, shape):
    state, losses, _ = run_steps(shape)
    np.testing.assert_allclose(losses, single_device[1], atol=1e-5, rtol=0)
    assert_trees_close(state.params, single_device[0].params, 1e-5)
    assert_trees_close(state.opt_state, single_device[0].opt_state, 1e-5)


def test_accumulated_microbatches_equal_one_batch(single_device):
    state, losses, _ = run_steps((1, 1, 1), microbatches=4)
    np.testing.assert_allclose(losses, single_device[1], atol=1e-5, rtol=0)
    assert_trees_close(state.params, single_device[0].params, 1e-5)


def test_loss_decreases_and_metrics(single_device):
    _, losses, metrics = run_steps((1, 1, 1), steps=6)
    assert losses[-1] < losses[0] - 0.1
    assert set(metrics) >= {"loss", "grad_norm", "learning_rate", "tokens"}


def test_schedule_warmup_peak_cosine_floor():
    cfg = OptimizerConfig(peak_learning_rate=3e-4, warmup_steps=100, total_steps=1000)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(50)), 1.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 3e-4, rtol=1e-6)
    mid = 100 + (1000 - 100) // 2  # half way down the cosine: (peak + floor) / 2
    np.testing.assert_allclose(float(lr(mid)), (3e-4 + 3e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(lr(1000)), 3e-5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(5000)), 3e-5, rtol=1e-6)
    assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(100, 1000, 37))


def test_adamw_update_equals_reference():
    """Our optimizer (the report's recipe) against AdamW written out in numpy: global-norm
    clipping, bias-corrected moments, decoupled weight decay on kernels/embeddings only."""
    cfg = OptimizerConfig(peak_learning_rate=1e-3, warmup_steps=0, total_steps=10,
                          grad_clip_norm=1.0)
    params = {"mlp": {"kernel": np.full((3, 2), 0.5, np.float32)},
              "ln": {"weight": np.ones((2,), np.float32)},
              "attn": {"bias": np.full((2,), 0.2, np.float32)}}
    grads = {"mlp": {"kernel": np.arange(6, dtype=np.float32).reshape(3, 2)},
             "ln": {"weight": np.array([1.0, -2.0], np.float32)},
             "attn": {"bias": np.array([0.5, 0.0], np.float32)}}
    tx = make_optimizer(cfg)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)

    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree_util.tree_leaves(grads)))
    scale = min(1.0, 1.0 / norm)
    for group, name in (("mlp", "kernel"), ("ln", "weight"), ("attn", "bias")):
        g = grads[group][name] * scale
        m_hat = (1 - cfg.b1) * g / (1 - cfg.b1)
        v_hat = (1 - cfg.b2) * g * g / (1 - cfg.b2)
        decay = cfg.weight_decay * params[group][name] if name == "kernel" else 0.0
        expected = -cfg.peak_learning_rate * (m_hat / (np.sqrt(v_hat) + cfg.eps) + decay)
        np.testing.assert_allclose(np.asarray(updates[group][name]), expected, rtol=1e-5,
                                   atol=1e-9)


def test_flops_and_mfu():
    cfg = preset("7b")
    per_token = flops.forward_flops_per_token(cfg, 2048)
    # 2 x (matmul params) + causal attention 4 H T_eff per layer
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size \
        - cfg.num_hidden_layers * (3 * cfg.hidden_size + 2 * cfg.hidden_size) - cfg.hidden_size
    attn = cfg.num_hidden_layers * 4 * cfg.hidden_size * (2048 + 1) / 2
    np.testing.assert_allclose(per_token, 2 * matmul_params + attn, rtol=1e-12)
    assert flops.train_flops_per_token(cfg, 2048) == 3 * per_token
    assert flops.mean_keys_per_query(8, window=2) == (1 + 2 * 7) / 8
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.mfu(98.5e12, "TPU v5 lite") == pytest.approx(0.5, rel=1e-3)
    assert flops.mfu(1e12, "Some Accelerator") is None


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        make_optimizer(dataclasses.replace(OPT, warmup_steps=-1))
    with pytest.raises(ValueError, match="peak_learning_rate=0"):
        make_optimizer(dataclasses.replace(OPT, peak_learning_rate=0))
    # AdamW's update is finite whenever the gradients are only with these in range, which
    # is what lets a step skip the update's norm (steps.checked_update).
    for bad in (dict(eps=0.0), dict(b1=1.0), dict(b2=1.0), dict(b2=-0.1)):
        with pytest.raises(ValueError, match=r"b1=.*b2=.*eps=.*expected b1 and b2 in \[0, 1\)"):
            make_optimizer(dataclasses.replace(OPT, **bad))
    # A run shorter than its warmup just ramps up (a quick demo run).
    lr = learning_rate_schedule(dataclasses.replace(OPT, warmup_steps=20, total_steps=6))
    np.testing.assert_allclose(float(lr(5)), OPT.peak_learning_rate * 5 / 20, rtol=1e-6)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_step_leaves_state_untouched(mode):
    """A step with a non-finite loss keeps params and optimizer state, counts the step; in
    "stop" mode every later step is frozen too, in "skip" mode training goes on."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = Trainer(CFG, OPT, mesh, nonfinite=mode)
    step = trainer.jit_train_step()
    rng = jax.random.PRNGKey(0)
    state = trainer.init_state(rng)
    good = jax.device_get(state)
    poisoned = jax.tree_util.tree_map(np.array, good.params)  # writable copies
    poisoned["lm_head"]["kernel"][0, 0] = np.nan
    bad_state = trainer.state_from_params(poisoned)
    before = jax.device_get(bad_state)
    after, metrics = step(bad_state, make_batch(), rng)
    after = jax.device_get(after)
    assert not np.isfinite(metrics["loss"])
    assert int(after.step) == 1 and int(after.nonfinite_steps) == 1
    assert int(after.last_nonfinite_step) == 1
    chex_equal = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
        lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    chex_equal(after.params, before.params)
    chex_equal(after.opt_state, before.opt_state)

    # A finite state carrying the count: "stop" stays frozen, "skip" trains on.
    resumed = trainer.state_from_params(good.params).replace(
        nonfinite_steps=jnp.ones((), jnp.int32), last_nonfinite_step=jnp.ones((), jnp.int32))
    start = jax.device_get(resumed)
    nxt, metrics = step(resumed, make_batch(), rng)
    nxt = jax.device_get(nxt)
    assert np.isfinite(metrics["loss"]) and int(nxt.nonfinite_steps) == 1
    changed = not np.array_equal(nxt.params["lm_head"]["kernel"],
                                 start.params["lm_head"]["kernel"])
    assert changed == (mode == "skip")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_fused_loss_step_equals_the_plain_one(microbatches):
    """The default fused lm_head + cross-entropy gives the plain step's loss, gradient norm
    and updated parameters (float32)."""
    from qwen_jax.train.steps import LossConfig

    mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
    batch = make_batch()
    results = []
    for loss in (LossConfig(fused=True, chunk_tokens=24), LossConfig(fused=False)):
        trainer = Trainer(CFG, OPT, mesh, microbatches=microbatches, loss=loss)
        state = trainer.init_state(jax.random.PRNGKey(0))
        state, metrics = trainer.jit_train_step()(state, batch, jax.random.PRNGKey(1))
        evals = trainer.jit_eval_step()(state.params, batch)
        results.append(jax.device_get((state.params, metrics["loss"], metrics["grad_norm"],
                                       evals["loss_sum"])))
    fused, plain = results
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-6)
    np.testing.assert_allclose(fused[2], plain[2], rtol=1e-5)
    np.testing.assert_allclose(fused[3], plain[3], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), fused[0],
                           plain[0])


def test_checked_update_flags_a_non_finite_gradient_and_norms_in_float32():
    """The gradient's norm decides: one infinite or NaN entry of a bfloat16 gradient makes the
    update not finite; a finite bfloat16 gradient's norm is the float32 norm, not one
    rounded to bfloat16."""
    tx = make_optimizer(OPT)
    params = {"a": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.zeros((5,), jnp.bfloat16)}
    state = tx.init(params)
    grads = {"a": jnp.full((3, 4), 0.3, jnp.bfloat16), "b": jnp.full((5,), 0.7, jnp.bfloat16)}
    _, _, norm, finite = checked_update(tx, grads, state, params)
    want = np.sqrt(12 * float(jnp.bfloat16(0.3)) ** 2 + 5 * float(jnp.bfloat16(0.7)) ** 2)
    assert norm.dtype == jnp.float32 and bool(finite)
    np.testing.assert_allclose(float(norm), want, rtol=1e-6)
    for poison in (np.inf, np.nan):
        bad = dict(grads, b=grads["b"].at[2].set(poison))
        new, _, norm, finite = checked_update(tx, bad, state, params)
        assert not bool(finite) and not np.isfinite(float(norm))
