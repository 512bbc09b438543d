"""The Pallas FlashAttention kernels against the XLA reference.

Numerics run both kernels (TPU/Mosaic and GPU/Triton) interpreted on CPU with small blocks so
that every case spans several tiles, partial tiles and skipped tiles. The compile tests build
the real TPU kernels for v5e/v5p/v6e topologies with libtpu (VMEM and (8, 128) layout errors
surface there exactly as on hardware) and lower the GPU kernels to Triton IR.

On a GPU, `QWEN_JAX_TEST_GPU_COMPILED=1 JAX_PLATFORMS=cuda pytest tests/test_flash_attention.py`
(bench/gpu_check.sh does this) runs the same numerics with the GPU kernels compiled by Triton
instead of interpreted; the TPU tests and those that need 8 devices are skipped there. Without
the variable nothing changes.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.kernels import BlockSizes, flash_attention, flash_attention_tpu
from qwen_jax.model.attention import attention, resolve_impl, xla_attention
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import init_cache
from qwen_jax.model.transformer import Qwen, init_params, param_shardings
from qwen_jax.parallel import sharding

# libtpu takes a host-wide lock; any other JAX process on this host that probed for a TPU
# (one started without JAX_PLATFORMS=cpu) holds it, and the topology compiles only need libtpu's
# compiler, not the chips.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

BLOCKS = BlockSizes(32, 64, 64, 32)  # differing fwd/bwd tiles: padding must agree across them


def _compiled_gpu() -> bool:
    if os.environ.get("QWEN_JAX_TEST_GPU_COMPILED", "") in ("", "0"):
        return False
    if jax.default_backend() != "gpu":
        raise RuntimeError("QWEN_JAX_TEST_GPU_COMPILED=1 needs a GPU backend (JAX_PLATFORMS=cuda; "
                           f"this process has {jax.default_backend()!r})")
    return True


# True: the GPU kernels run compiled (Triton) on this GPU; False: everything is interpreted.
COMPILED_GPU = _compiled_gpu()
tpu_only = pytest.mark.skipif(COMPILED_GPU, reason="compiled-GPU run: the TPU kernels are "
                              "checked interpreted on CPU and compiled with libtpu")
needs_8_devices = pytest.mark.skipif(COMPILED_GPU and jax.device_count() < 8,
                                     reason="compiled-GPU run: needs an 8-device mesh")
BACKENDS = (pytest.param("tpu", marks=tpu_only), "gpu")


def interpret(backend: str) -> bool:
    """Whether the kernel of `backend` runs interpreted in this test run."""
    return not (COMPILED_GPU and backend == "gpu")


def inputs(seed, batch, q_len, kv_len, heads, dim, dtype=jnp.float32, segments=False,
           q_offset=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, dim)), dtype)
               for n in (q_len, kv_len, kv_len))
    d_out = jnp.asarray(rng.normal(size=(batch, q_len, heads, dim)), dtype)
    q_seg = kv_seg = None
    if segments:  # packed documents (sorted ids) and a left-padded row (id 0 first)
        kv_seg = np.sort(rng.integers(1, 4, size=(batch, kv_len)), axis=1)
        kv_seg[-1, :kv_len // 3] = 0
        kv_seg = jnp.asarray(kv_seg, jnp.int32)
        q_seg = kv_seg[:, q_offset:q_offset + q_len]
    return q, k, v, d_out, q_seg, kv_seg


def value_and_grads(fn, q, k, v, d_out):
    """Output and (dq, dk, dv) of <fn(q, k, v), d_out>."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(d_out))


def compare(backend, *, q_len, kv_len, causal=True, window=0, segments=False, q_offset=0,
            dtype=jnp.float32, dim=64, atol=2e-5, rtol=0.0, blocks=BLOCKS, heads=2):
    q, k, v, d_out, q_seg, kv_seg = inputs(q_len + kv_len, 2, q_len, kv_len, heads, dim, dtype,
                                           segments, q_offset)
    kw = dict(causal=causal, window=window, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              q_offset=q_offset)
    kernel = jax.jit(functools.partial(
        value_and_grads, lambda q, k, v: flash_attention(
            q, k, v, backend=backend, block_sizes=blocks, interpret=interpret(backend),
            **kw)))
    got = kernel(q, k, v, d_out)
    want = value_and_grads(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v, d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=atol, rtol=rtol, err_msg=name)


CASES = {  # q_len, kv_len and masking; 96 is a multiple of every block, the others are not
    "causal_aligned": dict(q_len=96, kv_len=96),
    "causal_ragged": dict(q_len=100, kv_len=100),
    "full_ragged": dict(q_len=100, kv_len=100, causal=False),
    "window": dict(q_len=130, kv_len=130, window=40),
    "segments": dict(q_len=120, kv_len=120, segments=True),
    "chunk_over_cache": dict(q_len=40, kv_len=150, q_offset=110),
    "chunk_window_segments": dict(q_len=40, kv_len=150, q_offset=107, window=37, segments=True),
    "full_window_segments": dict(q_len=72, kv_len=72, causal=False, window=20, segments=True),
}


@tpu_only
@pytest.mark.parametrize("case", CASES)
def test_tpu_kernel_float32(case):
    compare("tpu", **CASES[case])


@pytest.mark.parametrize("case", ["causal_ragged", "full_ragged", "chunk_window_segments"])
def test_gpu_kernel_float32(case):
    compare("gpu", **CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_head_dim_128(backend):
    """bf16 in and out (float32 softmax/accumulators on both sides): within bf16 rounding."""
    compare(backend, q_len=100, kv_len=100, window=50, dtype=jnp.bfloat16, dim=128, atol=3e-2,
            rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_traced_window_and_offset_share_one_compilation(backend):
    q, k, v, _, _, _ = inputs(0, 1, 16, 96, 2, 64)
    fn = jax.jit(lambda w, o: flash_attention(q, k, v, window=w, q_offset=o, backend=backend,
                                              block_sizes=BlockSizes(16, 32, 16, 32),
                                              interpret=interpret(backend)))
    for window, offset in [(0, 80), (7, 80), (40, 3), (1, 50)]:
        want = xla_attention(q, k, v, window=window, q_offset=offset)
        np.testing.assert_allclose(np.asarray(fn(window, offset)), np.asarray(want), atol=2e-5)
    assert fn._cache_size() == 1


def test_rows_that_see_nothing_are_zero_with_finite_grads():
    """Queries whose segment has no key: output 0 (documented divergence from the reference)."""
    q, k, v, d_out, _, _ = inputs(1, 1, 64, 64, 1, 64)
    q_seg = jnp.asarray([[1] * 32 + [2] * 32], jnp.int32)
    kv_seg = jnp.asarray([[1] * 64], jnp.int32)
    backend = "gpu" if COMPILED_GPU else "tpu"
    fn = lambda q, k, v: flash_attention(q, k, v, causal=False, q_segment_ids=q_seg,  # noqa
                                         kv_segment_ids=kv_seg, block_sizes=BLOCKS,
                                         backend=backend, interpret=interpret(backend))
    out, dq, dk, dv = value_and_grads(fn, q, k, v, d_out)
    np.testing.assert_array_equal(np.asarray(out[:, 32:]), 0.0)
    want = xla_attention(q[:, :32], k, v, causal=False)
    np.testing.assert_allclose(np.asarray(out[:, :32]), np.asarray(want), atol=2e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
    np.testing.assert_array_equal(np.asarray(dq[:, 32:]), 0.0)


@needs_8_devices
def test_dispatch_runs_under_shard_map_on_a_mesh():
    """impl='pallas' with a mesh in context: batch over (data, fsdp), heads over tensor."""
    assert resolve_impl("pallas") == "pallas"
    q, k, v, d_out, q_seg, kv_seg = inputs(3, 4, 48, 48, 4, 64, segments=True)
    kw = dict(causal=True, window=20, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    mesh = sharding.make_mesh((2, 2, 2))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    fn = jax.jit(functools.partial(value_and_grads, lambda q, k, v: attention(
        q, k, v, impl="pallas", block_sizes=BlockSizes(16, 32, 16, 16), **kw)))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v, d_out))
        got = fn(*jax.device_put((q, k, v, d_out), act))
    assert "shard_map" in jaxpr
    want = value_and_grads(lambda q, k, v: xla_attention(q, k, v, **kw), q, k, v, d_out)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


CFG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
                 intermediate_size=256, seq_length=32, vocab_size=256, initializer_range=0.2,
                 max_position_embeddings=256, dtype="float32", param_dtype="float32",
                 matmul_precision="highest", attention_impl="xla", window_sizes=(7, 0))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def test_model_forward_and_gradient_pallas_equals_xla(params):
    """Packed documents, per-layer windows (traced inside nn.scan), forward and dLoss/dparams."""
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, 256)
    segment_ids = jnp.asarray([[1] * 15 + [2] * 25, [0] * 6 + [1] * 34], jnp.int32)

    def loss(config, params):
        logits = Qwen(config).apply({"params": params}, ids, segment_ids=segment_ids)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segment_ids > 0)), logits

    results = {}
    for impl in ("xla", "pallas"):
        fn = jax.jit(jax.value_and_grad(functools.partial(loss, CFG.replace(attention_impl=impl)),
                                        has_aux=True))
        results[impl] = fn(params)
    (loss_x, logits_x), grads_x = results["xla"]
    (loss_p, logits_p), grads_p = results["pallas"]
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), atol=2e-5)
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads_p):
        want = functools.reduce(lambda t, key: t[key.key], path, grads_x)
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


@needs_8_devices
def test_sharded_model_and_cached_chunks_pallas_equal_xla(params):
    """The kernel under shard_map inside nn.scan (FSDP x tensor mesh), and cached prefill chunks
    and single-token decoding (q_len != kv_len at a traced offset)."""
    pallas = CFG.replace(attention_impl="pallas")
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 40), 0, 256)
    single = jax.jit(lambda p, t: Qwen(CFG).apply({"params": p}, t)[0])(params, ids)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings, batch = param_shardings(pallas, mesh), sharding.batch_sharding(mesh)
    with sharding.activation_sharding(mesh):
        fn = jax.jit(lambda p, t: Qwen(pallas).apply({"params": p}, t)[0],
                     in_shardings=(shardings, batch))
        assert "shard_map" in str(jax.make_jaxpr(fn)(params, ids))
        out = fn(jax.device_put(params, shardings), jax.device_put(ids, batch))
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=2e-5)

    step = jax.jit(lambda config, p, t, cache: Qwen(config).apply({"params": p}, t, cache=cache),
                   static_argnums=0)
    caches = {c: init_cache(CFG, 4, 48, jnp.float32) for c in (CFG, pallas)}
    for start, stop in [(0, 30), (30, 31)]:  # a prefill chunk, then one decoding step
        logits = {}
        for config in (CFG, pallas):
            logits[config], caches[config] = step(config, params, ids[:, start:stop],
                                                  caches[config])
        np.testing.assert_allclose(np.asarray(logits[pallas]), np.asarray(logits[CFG]),
                                   atol=2e-5)


# --- TPU compile checks (libtpu, no TPU needed) -------------------------------------------------

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5:2x2x1", "v6e": "v6e:2x2"}
SEQ, HEADS, DIM = 8192, 8, 128


def _grad_of_attention(q, k, v, seg, window, **kw):
    def loss(q, k, v):
        out = attention(q, k, v, causal=True, window=window, q_segment_ids=seg,
                        kv_segment_ids=seg, impl="pallas", interpret=False, **kw)
        return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _kernel_names(compiled) -> set[str]:
    text = compiled.as_text()
    return {n for n in ("flash_fwd_tpu", "flash_dq_tpu", "flash_dkdv_tpu") if n in text}


@tpu_only
@pytest.mark.parametrize("generation", TOPOLOGIES)
def test_tpu_kernels_compile_single_chip(generation):
    """Forward + backward at bf16, head_dim 128, seq 8192 with a traced window, one chip."""
    device = topologies.get_topology_desc(topology_name=TOPOLOGIES[generation],
                                          platform="tpu").devices[0]
    one = SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((1, SEQ, HEADS, DIM), jnp.bfloat16, sharding=one)
    window = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
    fn = jax.jit(lambda q, k, v, w: _grad_of_attention(q, k, v, None, w))
    with jax.default_device(device):
        assert flash_attention_tpu.generation() == generation
        compiled = fn.lower(x, x, x, window).compile()
    assert _kernel_names(compiled) == {"flash_fwd_tpu", "flash_dq_tpu", "flash_dkdv_tpu"}


@tpu_only
@pytest.mark.parametrize("generation", TOPOLOGIES)
def test_tpu_kernels_compile_under_shard_map(generation):
    """The model's path: a (data, fsdp, tensor) mesh over 4 chips, segment ids, traced window;
    also a prefill chunk of 512 queries and a decoding step over an 8192-key cache at a traced
    offset."""
    devices = topologies.get_topology_desc(topology_name=TOPOLOGIES[generation],
                                           platform="tpu").devices
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 2, 2), sharding.MESH_AXES)
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((2, SEQ, HEADS, DIM), jnp.bfloat16, sharding=act)
    chunk = jax.ShapeDtypeStruct((2, 512, HEADS, DIM), jnp.bfloat16, sharding=act)
    token = jax.ShapeDtypeStruct((2, 1, HEADS, DIM), jnp.bfloat16, sharding=act)
    seg = jax.ShapeDtypeStruct((2, SEQ), jnp.int32, sharding=NamedSharding(mesh, P(("data",
                                                                                 "fsdp"))))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    train = jax.jit(lambda q, k, v, s, w: _grad_of_attention(q, k, v, s, w))
    prefill = jax.jit(lambda q, k, v, w, o: attention(q, k, v, window=w, q_offset=o,
                                                      impl="pallas", interpret=False))
    with jax.set_mesh(mesh):
        compiled = train.lower(x, x, x, seg, scalar).compile()
        compiled_chunk = prefill.lower(chunk, x, x, scalar, scalar).compile()
        compiled_token = prefill.lower(token, x, x, scalar, scalar).compile()
    assert _kernel_names(compiled) == {"flash_fwd_tpu", "flash_dq_tpu", "flash_dkdv_tpu"}
    assert _kernel_names(compiled_chunk) == _kernel_names(compiled_token) == {"flash_fwd_tpu"}


@pytest.mark.parametrize("seq", [1100, 40])
def test_gpu_kernels_lower_to_triton(seq):
    """Forward + backward lower to Triton IR (block shapes, ops) for a CUDA target. 1100 pads
    to 1152, not a power of 2; at 40 the default tiles shrink, to 64 (Triton's tiles are
    powers of 2)."""
    x = jax.ShapeDtypeStruct((2, seq, 4, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, seq), jnp.int32)
    window = jax.ShapeDtypeStruct((), jnp.int32)
    fn = jax.jit(lambda q, k, v, s, w: _grad_of_attention(q, k, v, s, w, backend="gpu"))
    text = fn.trace(x, x, x, seg, window).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("flash_fwd_gpu", "flash_dq_gpu", "flash_dkdv_gpu"):
        assert name in text
