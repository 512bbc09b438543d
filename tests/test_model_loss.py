"""The fused, chunked lm_head + cross-entropy against the plain loss: values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_jax.model import loss as loss_module
from qwen_jax.model.loss import fused_cross_entropy
from qwen_jax.parallel import sharding


def plain(hidden, kernel, targets, z_loss=0.0, eps=0.0):
    logits = jnp.einsum("bth,hv->btv", hidden, kernel, precision="highest")
    logz = jax.nn.logsumexp(logits, -1)
    vocab = kernel.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), eps) if eps else \
        jax.nn.one_hot(targets, vocab)
    return optax.softmax_cross_entropy(logits, labels) + z_loss * logz ** 2


def data(b=3, t=37, h=24, v=101, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(b, t, h)), jnp.float32),
            jnp.asarray(r.normal(size=(h, v)) * 0.3, jnp.float32),
            jnp.asarray(r.integers(0, v, (b, t)), jnp.int32),
            jnp.asarray(r.random((b, t)) > 0.3, jnp.float32))


@pytest.mark.parametrize("chunk_tokens, z_loss, eps", [
    (12, 0.0, 0.0),      # chunks of 4 positions x 3 rows; 37 is padded to 40
    (10_000, 0.0, 0.0),  # one chunk
    (30, 1e-3, 0.0),
    (30, 0.0, 0.1),
    (7, 1e-4, 0.05),
])
def test_matches_the_plain_loss_and_gradients(chunk_tokens, z_loss, eps):
    hidden, kernel, targets, mask = data()

    def fused_sum(h, k):
        loss = fused_cross_entropy(h, k, targets, chunk_tokens=chunk_tokens, z_loss=z_loss,
                                   label_smoothing=eps, precision="highest")
        return jnp.sum(loss * mask), loss

    def plain_sum(h, k):
        loss = plain(h, k, targets, z_loss, eps)
        return jnp.sum(loss * mask), loss

    (got, got_each), got_grads = jax.jit(jax.value_and_grad(fused_sum, (0, 1), has_aux=True))(
        hidden, kernel)
    (want, want_each), want_grads = jax.jit(jax.value_and_grad(plain_sum, (0, 1),
                                                               has_aux=True))(hidden, kernel)
    chex.assert_shape(got_each, targets.shape)
    chex.assert_trees_all_close(got_each, want_each, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32_and_gradient_dtypes():
    hidden, kernel, targets, mask = data(v=257)
    loss = lambda h, k, dtype: jnp.sum(fused_cross_entropy(  # noqa: E731
        h, k, targets, dtype=dtype, chunk_tokens=16) * mask)
    g32 = jax.jit(jax.grad(lambda h, k: loss(h, k, jnp.float32), (0, 1)))(hidden, kernel)
    g16 = jax.jit(jax.grad(lambda h, k: loss(h, k, jnp.bfloat16), (0, 1)))(
        hidden.astype(jnp.bfloat16), kernel)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    np.testing.assert_allclose(jax.jit(lambda h, k: loss(h, k, jnp.bfloat16))(
        hidden.astype(jnp.bfloat16), kernel), loss(hidden, kernel, jnp.float32), rtol=2e-2)
    np.testing.assert_allclose(np.asarray(g16[1]), np.asarray(g32[1]), atol=0.05 * float(
        jnp.abs(g32[1]).max()))


def test_never_materialises_the_logits():
    """No [tokens, vocab] buffer in the compiled forward + backward: the largest temporary
    is one chunk's logits."""
    b, t, h, v = 2, 512, 16, 4096
    hidden = jnp.zeros((b, t, h), jnp.float32)
    kernel = jnp.zeros((h, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)
    step = jax.jit(jax.grad(lambda hh, k: jnp.sum(fused_cross_entropy(
        hh, k, targets, chunk_tokens=128)), (0, 1)))
    text = step.lower(hidden, kernel).compile().as_text()
    assert f"[{b},{t},{v}]" not in text and f"[{b * t},{v}]" not in text
    assert f"[{b},64,{v}]" in text or f"[128,{v}]" in text


@pytest.mark.parametrize("chunk_tokens, dots", [(4096, 3), (128, 4)])
def test_one_chunk_on_cpu_reuses_the_forward_logits(chunk_tokens, dots):
    """One chunk on CPU: the backward pass takes the forward's logits (3 vocabulary-wide
    matmuls: logits, dh, dkernel); several chunks make each chunk's logits again (4)."""
    b, t, h, v = 2, 512, 16, 4099
    hidden = jnp.zeros((b, t, h), jnp.float32)
    kernel = jnp.zeros((h, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)
    step = jax.jit(jax.grad(lambda hh, k: jnp.sum(fused_cross_entropy(
        hh, k, targets, chunk_tokens=chunk_tokens)), (0, 1)))
    text = step.lower(hidden, kernel).as_text()
    found = [line for line in text.splitlines()  # (the log-partition's sum is a matvec)
             if "dot_general" in line and str(v) in line and f"tensor<{v}xf32>" not in line]
    assert len(found) == dots, found


def _vocab_grads(mesh, hidden, kernel, targets, mask):
    """bf16 gradients of the fused loss traced under `mesh`, and the number of
    vocabulary-wide products in the traced program."""
    h16 = hidden.astype(jnp.bfloat16)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.grad(lambda h, k: jnp.sum(fused_cross_entropy(
            h, k, targets, dtype=jnp.bfloat16) * mask), (0, 1)))
        vocab_dots = [line for line in fn.lower(h16, kernel).as_text().splitlines()
                      if "dot_general" in line and f"tensor<{kernel.shape[1]}xf32>" not in line]
        return fn(h16, kernel), len(vocab_dots)


def _mesh(n):
    return sharding.make_mesh((1, 1, n), jax.devices()[:n])


def test_cpu_half_precision_hidden_gradient_runs_over_vocabulary_slices(monkeypatch):
    """bf16 on CPU, one device: dh = dlogits W^T is a float32 sum of products over slices of
    the vocabulary (one product per slice in the compiled step); the gradients are those of
    the single product up to the order of the float32 additions."""
    args = data(v=257)
    (dh_whole, dk_whole), whole_dots = _vocab_grads(_mesh(1), *args)  # 257 words: one slice
    monkeypatch.setattr(loss_module, "CPU_VOCAB_SLICE", 40)
    (dh, dk), dots = _vocab_grads(_mesh(1), *args)
    assert (whole_dots, dots) == (3, 2 + 6)  # logits, dkernel and dh in 1 or round(257/40)
    assert dh.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh_whole, np.float32),
                               rtol=1e-2, atol=1e-3 * float(jnp.abs(dh_whole).max()))
    np.testing.assert_array_equal(np.asarray(dk), np.asarray(dk_whole))


def test_vocabulary_slices_only_on_one_device(monkeypatch):
    """Over several devices the vocabulary may be partitioned, and slicing it would cost
    collectives per slice: dh stays one product."""
    monkeypatch.setattr(loss_module, "CPU_VOCAB_SLICE", 40)
    hidden, kernel, targets, mask = data(v=256)
    two = _mesh(2)
    kernel = jax.device_put(kernel, jax.sharding.NamedSharding(
        two, jax.sharding.PartitionSpec(None, "tensor")))
    (dh, _), dots = _vocab_grads(two, hidden, kernel, targets, mask)
    assert dots == 3
    (dh_one, _), sliced = _vocab_grads(_mesh(1), hidden, np.asarray(kernel), targets, mask)
    assert sliced == 2 + 6
    np.testing.assert_allclose(np.asarray(dh, np.float32), np.asarray(dh_one, np.float32),
                               rtol=1e-2, atol=1e-3 * float(jnp.abs(dh_one).max()))
