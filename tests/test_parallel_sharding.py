"""Sharding on 8 emulated CPU devices: same logits as one device; rules checked."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import CACHE_LOGICAL_AXES, init_cache
from qwen_jax.model.transformer import Qwen, init_params, param_shardings
from qwen_jax.parallel import sharding

CFG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
                 intermediate_size=256, seq_length=32, vocab_size=256, initializer_range=0.1,
                 max_position_embeddings=256, dtype="float32", param_dtype="float32",
                 matmul_precision="highest", attention_impl="xla")


def test_eight_devices():
    assert jax.device_count() == 8, "conftest must set up 8 CPU devices before JAX starts"


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_equals_single_device(shape):
    params = init_params(CFG, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 40), 0, 256)  # 40 > S: NTK + LogN on
    single = jax.jit(lambda p, t: Qwen(CFG).apply({"params": p}, t)[0])(params, ids)

    mesh = sharding.make_mesh(shape)
    shardings = param_shardings(CFG, mesh)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["layers"]["attn"]["q"]["kernel"].sharding.spec == \
        P(None, "fsdp", "tensor", None)
    batch = sharding.batch_sharding(mesh)
    with sharding.activation_sharding(mesh):
        fn = jax.jit(lambda p, t: Qwen(CFG).apply({"params": p}, t)[0],
                     in_shardings=(shardings, batch))
        out = fn(sharded_params, jax.device_put(ids, batch))
    expected = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert out.sharding.is_equivalent_to(expected, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5, rtol=0)


def test_sharded_cached_decoding():
    params = init_params(CFG, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 12), 0, 256)
    mesh = sharding.make_mesh((2, 2, 2))
    cache = init_cache(CFG, 4, 16, jnp.float32)
    cache_shardings = sharding.tree_shardings(
        jax.tree_util.tree_map(lambda axes: P(*axes), CACHE_LOGICAL_AXES,
                               is_leaf=lambda x: isinstance(x, tuple)), mesh, cache)
    step = lambda p, t, c: Qwen(CFG).apply({"params": p}, t, cache=c)  # noqa: E731
    want, _ = jax.jit(step)(params, ids, cache)
    with sharding.activation_sharding(mesh):
        got, new_cache = jax.jit(step)(jax.device_put(params, param_shardings(CFG, mesh)),
                                       ids, jax.device_put(cache, cache_shardings))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert int(new_cache.index) == 12


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    with pytest.raises(sharding.ShardingError, match="does not match the 8 devices"):
        sharding.mesh_shape((2, 2, 4), 8)
    with pytest.raises(sharding.ShardingError, match="not divisible by 3"):
        sharding.mesh_shape((3, -1, 1), 8)
    with pytest.raises(sharding.ShardingError, match="expected 3 sizes"):
        sharding.mesh_shape((8,), 8)


def test_rules_reject_colliding_and_unknown_axes():
    assert sharding.logical_to_spec(("activation_batch", None, "heads")) == \
        P(("data", "fsdp"), None, "tensor")
    with pytest.raises(sharding.ShardingError, match="both map to mesh axis 'tensor'"):
        sharding.logical_to_spec(("heads", "mlp"))
    with pytest.raises(sharding.ShardingError, match="has no rule"):
        sharding.logical_to_spec(("sequence",))


def test_indivisible_dimension_is_reported():
    mesh = sharding.make_mesh((1, 1, 8))
    with pytest.raises(sharding.ShardingError, match=r"\['layers'\]\['attn'\]\['k'\]\['bias'\]"
                       r"|dimension 4 .* not divisible by the mesh size 8"):
        param_shardings(CFG, mesh)


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 4, 1)])
def test_embedding_lookup_and_gradient_stay_in_each_shards_columns(shape):
    """Each fsdp shard looks up its own columns of the table for all its data group's
    tokens, and its part of the table's gradient is a scatter-add into those columns: no
    device materializes the whole table or a gradient of its full width (the table gathered
    over fsdp gave a full float32 scatter-add and its all-reduce on every microbatch). The
    gradient equals one device's."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(3), (8, 16), 0, 256)

    def loss(p, t):
        logits = Qwen(CFG).apply({"params": p}, t)[0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    want = jax.jit(jax.grad(loss))(params, ids)["embed"]["embedding"]
    mesh = sharding.make_mesh(shape)
    shardings = param_shardings(CFG, mesh)
    batch = sharding.batch_sharding(mesh)
    with sharding.activation_sharding(mesh):
        fn = jax.jit(jax.grad(loss), in_shardings=(shardings, batch))
        compiled = fn.lower(params, ids).compile()
        got = fn(jax.device_put(params, shardings), jax.device_put(ids, batch))
    np.testing.assert_allclose(np.asarray(got["embed"]["embedding"]), np.asarray(want),
                               atol=1e-6, rtol=0)
    hlo = compiled.as_text()
    width = CFG.hidden_size
    full = [line for line in hlo.splitlines()
            if re.search(rf"\[\d+,{width}\]", line)
            and re.search(r"(?<![\w-])(scatter|gather)\(", line)]
    assert not full, full[:3]
    assert "all-to-all" in hlo
