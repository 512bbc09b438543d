"""Compile-only for the alignment steps (`train.py --compile-only` with task reward, dpo or
ppo): the step compiled for a TPU topology from shape-only inputs, as qwen_jax.train.aot does
for next-token training, reporting per-device memory against HBM, XLA's FLOPs and the
collectives. The PPO step holds all four models (policy and value with their optimizer
states, the frozen reference and reward model in `align.frozen_dtype`) and the rollout
batch; the rollout sampler's decode step is compiled beside it. No checkpoint or data is
read: the model is `config.model`'s preset (init_from only fixes the weights).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen_jax.align.common import PAIR_KEYS
from qwen_jax.data.pipeline import BATCH_KEYS
from qwen_jax.parallel import sharding as shd
from qwen_jax.train import aot


def _structs(shapes: dict, sharding_for) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_for(len(shape)))
            for k, (shape, dtype) in shapes.items()}


def _frozen(abstract, dtype: str):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype),
                                                       sharding=s.sharding), abstract)


def _pair_batch(cfg, mesh):
    b, t = cfg.global_batch_size, cfg.data.seq_len
    shapes = {k: ((b,) if k in ("margin", "valid") else (b, t),
                  jnp.float32 if k in ("margin", "valid") else jnp.int32) for k in PAIR_KEYS}
    return _structs(shapes, lambda ndim: shd.batch_sharding(mesh, ndim))


def _task_for_tpu(cfg, mesh):
    """The task of cfg without data, its model config (and its Trainers') set for TPU."""
    if cfg.task == "ppo":
        from qwen_jax.align.ppo import PPOTask as cls
    elif cfg.task == "reward":
        from qwen_jax.align.reward import RewardTask as cls
    else:
        from qwen_jax.align.dpo import DPOTask as cls
    task = cls(cfg, mesh, load=False)
    task.model_config = aot._tpu_model_config(task.model_config)
    for name in ("trainer", "value_trainer", "lm_trainer"):
        if hasattr(task, name):
            setattr(task, name, dataclasses.replace(getattr(task, name),
                                                    model_config=task.model_config))
    return task


def compile_step(cfg, mesh, sl: aot.Slice) -> dict:
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
    task = _task_for_tpu(cfg, mesh)
    a = cfg.align
    with jax.default_device(sl.devices[0]):
        if cfg.task == "reward":
            lowered = task.jit_train_step().lower(task.abstract_state(),
                                                  _pair_batch(cfg, mesh), rng)
            return aot._compile(lowered, sl)
        reference = _frozen(task.trainer.abstract_state().params, a.frozen_dtype)
        if cfg.task == "dpo":
            lowered = task.jit_train_step().lower(task.abstract_state(),
                                                  _pair_batch(cfg, mesh), rng, reference)
            return aot._compile(lowered, sl)
        reward = _frozen(task.value_trainer.abstract_state().params, a.frozen_dtype)
        ptx = None
        if a.ptx_coef > 0:
            ptx = _structs({k: ((a.ptx_batch_size, cfg.data.seq_len),
                                jnp.float32 if k == "loss_mask" else jnp.int32)
                            for k in BATCH_KEYS}, lambda n: shd.batch_sharding(mesh, n))
        lowered = task.jit_update().lower(task.abstract_state(), reference, reward,
                                          task.abstract_rollout(), ptx, rng)
    return aot._compile(lowered, sl)


def check(cfg, topology_name: str, num_slices: int = 1, decode_batch: int | None = 0) -> dict:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.init_from = ""  # the preset's shapes; no checkpoint is read
    sl = aot.topology(topology_name, num_slices)
    mesh = aot.topology_mesh(tuple(cfg.mesh), sl)
    from qwen_jax.train import build as train_build

    model_config = train_build.model_config(cfg)
    report = {"task": cfg.task, "topology": sl.name, "num_slices": sl.num_slices,
              "devices": len(sl.devices), "device_kind": sl.devices[0].device_kind,
              "mesh": dict(mesh.shape), "model": cfg.model,
              "params": model_config.num_params(), "seq_len": cfg.data.seq_len,
              "global_batch": cfg.global_batch_size,
              "remat_policy": model_config.remat_policy}
    report["train"] = compile_step(cfg, mesh, sl)
    if cfg.task == "ppo" and decode_batch is not None:
        report["decode"] = aot.compile_decode(model_config, mesh, sl,
                                              decode_batch or cfg.global_batch_size,
                                              cfg.data.seq_len)
    report["fits"] = report["train"]["fits"] and report.get("decode", {}).get("fits", True)
    return report


STEP_NAMES = {"reward": "reward model step", "dpo": "DPO step",
              "ppo": "PPO step (experience + updates, four models)"}


def format_report(report: dict) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [f"compile-only: {report['task']} on {report['model']} "
             f"({report['params'] / 1e9:.2f}B params) on {report['topology']} x "
             f"{report['num_slices']} slice(s): {report['devices']} devices "
             f"({report['device_kind']}), mesh {mesh}",
             f"batch {report['global_batch']} x {report['seq_len']} tokens, remat "
             f"{report['remat_policy']}",
             *aot._step_lines(STEP_NAMES[report["task"]], report["train"])]
    if "decode" in report:
        d = report["decode"]
        lines.append(f"rollout decode step: batch {d['batch']}, cache {d['cache_len']} tokens")
        lines += aot._step_lines("decode step", d)
    lines.append("result: " + ("fits" if report["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)
