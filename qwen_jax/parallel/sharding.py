"""Where sharding is decided: the ('data', 'fsdp', 'tensor') mesh and the logical-axis rules.

Every parameter and the main activations carry logical axis names (`embed`, `heads`, `mlp`,
`vocab`, `activation_batch`, ...). `RULES` maps them to mesh axes: FSDP shards parameters over
'fsdp', Megatron-style tensor parallelism shards heads, MLP width and vocabulary over 'tensor',
and the batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("lookup_batch", "data"),  # the embedding lookup's rows: every fsdp shard takes them all
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


class ShardingError(ValueError):
    """A mesh or sharding request that cannot work on the devices or shapes at hand."""


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve a (data, fsdp, tensor) shape where one entry may be -1 (= fill)."""
    try:
        requested = tuple(int(s) for s in requested)
    except (TypeError, ValueError):
        raise ShardingError(f"mesh shape {requested!r}: expected integers for axes "
                            f"{MESH_AXES}") from None
    if len(requested) != len(MESH_AXES):
        raise ShardingError(f"mesh shape {requested}: expected {len(MESH_AXES)} sizes for axes "
                            f"{MESH_AXES}")
    if requested.count(-1) > 1 or any(s == 0 or s < -1 for s in requested):
        raise ShardingError(f"mesh shape {requested}: sizes must be positive, one may be -1")
    known = math.prod(s for s in requested if s != -1)
    if -1 in requested:
        if num_devices % known:
            raise ShardingError(f"mesh shape {requested}: {num_devices} devices are not "
                                f"divisible by {known}")
        requested = tuple(num_devices // known if s == -1 else s for s in requested)
    if math.prod(requested) != num_devices:
        raise ShardingError(f"mesh shape {requested} (= {math.prod(requested)} devices) does "
                            f"not match the {num_devices} devices available")
    return requested


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    resolved = mesh_shape(shape, len(devices))
    try:  # topology-aware device order (ICI rings on TPU)
        return jax.make_mesh(resolved, MESH_AXES, devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    except (ValueError, AssertionError, NotImplementedError):
        return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], rules=RULES) -> PartitionSpec:
    """PartitionSpec for logical axis names; raises when one mesh axis would be used twice."""
    table = dict(rules)
    used: dict[str, str] = {}
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        for axis in axes:
            if axis in used:
                raise ShardingError(f"logical axes {used[axis]!r} and {name!r} both map to mesh "
                                    f"axis {axis!r} in {tuple(logical)}")
            used[axis] = name
        out.append(target if target is None or isinstance(target, str) else tuple(target))
    return PartitionSpec(*out)


def tree_shardings(logical_tree, mesh: Mesh, shapes=None, rules=RULES):
    """NamedShardings for a pytree of logical PartitionSpecs, checking divisibility by shape."""

    def one(path, logical, shape=None):
        spec = logical_to_spec(tuple(logical), rules)
        if shape is not None:
            for dim, axes in zip(shape.shape, spec):
                size = math.prod(mesh.shape[a] for a in _axes(axes))
                if dim % size:
                    raise ShardingError(
                        f"{jax.tree_util.keystr(path)}: dimension {dim} ({spec}) is not "
                        f"divisible by the mesh size {size} of {_axes(axes)}")
        return NamedSharding(mesh, spec)

    is_leaf = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    if shapes is None:
        return jax.tree_util.tree_map_with_path(one, logical_tree, is_leaf=is_leaf)
    return jax.tree_util.tree_map_with_path(one, logical_tree, shapes, is_leaf=is_leaf)


def _axes(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of [batch, ...] input arrays: batch over ('data', 'fsdp')."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES):
    """Context in which the model's logical activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def target_platform() -> str:
    """Platform the running trace is for: the context mesh's devices, else the default device
    (an AOT compile for a TPU topology traces on a CPU host)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    device = jax.config.jax_default_device
    return device.platform if device is not None else jax.default_backend()
