"""The XLA reference attention against a naive loop with explicit masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model.attention import attention, resolve_impl


def naive_attention(q, k, v, causal, window, q_seg, kv_seg, q_offset):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_len, heads, dim = q.shape
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            for i in range(q_len):
                pos = q_offset + i
                keys = [j for j in range(k.shape[1])
                        if (not causal or j <= pos)
                        and (not window or j > pos - window)
                        and (q_seg is None or q_seg[b, i] == kv_seg[b, j])]
                scores = np.array([q[b, i, n] @ k[b, j, n] for j in keys]) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, i, n] = sum(w * v[b, j, n] for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("causal, window, segments, q_len, q_offset", [
    (True, 0, False, 12, 0),
    (False, 0, False, 12, 0),
    (True, 4, False, 12, 0),
    (True, 0, True, 12, 0),
    (True, 3, True, 12, 0),
    (True, 0, False, 3, 9),  # a chunk of 3 queries at the end of 12 keys (cached call)
    (True, 5, False, 1, 11),  # one decoding step with a window
])
def test_matches_naive(causal, window, segments, q_len, q_offset):
    rng = np.random.default_rng(0)
    kv_len, batch, heads, dim = 12, 2, 3, 8
    q = rng.normal(size=(batch, q_len, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_len, heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, kv_len, heads, dim)).astype(np.float32)
    q_seg = kv_seg = None
    if segments:  # two packed documents in row 0, left padding in row 1
        kv_seg = np.array([[1] * 5 + [2] * 7, [0] * 4 + [1] * 8], np.int32)
        q_seg = kv_seg[:, q_offset:q_offset + q_len]
    fn = jax.jit(lambda q, k, v, qs, ks: attention(
        q, k, v, causal=causal, window=window, q_segment_ids=qs, kv_segment_ids=ks,
        q_offset=q_offset, impl="xla", precision="highest"))
    got = fn(q, k, v, q_seg, kv_seg)
    want = naive_attention(q, k, v, causal, window, q_seg, kv_seg, q_offset)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_traced_window_and_offset():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32) for _ in range(3))
    fn = jax.jit(lambda w, o: attention(q, k, v, window=w, q_offset=o, impl="xla"))
    for window in (0, 2):
        want = naive_attention(q, k, v, True, window, None, None, 0)
        np.testing.assert_allclose(np.asarray(fn(window, 0)), want, atol=1e-5)


def test_impl_resolution():
    assert resolve_impl("auto") == "xla"  # CPU
    with pytest.raises(ValueError, match="not available"):
        resolve_impl("triton")
