"""`config.task` -> the alignment task train.py runs (next-token training is the default
task of qwen_jax.train.loop)."""

from __future__ import annotations

from qwen_jax.align.common import TASKS, check_align_config
from qwen_jax.train.build import TrainError


def make_task(cfg):
    check_align_config(cfg)
    if cfg.task == "reward":
        from qwen_jax.align.reward import RewardTask
        return RewardTask(cfg)
    if cfg.task == "dpo":
        from qwen_jax.align.dpo import DPOTask
        return DPOTask(cfg)
    if cfg.task == "ppo":
        from qwen_jax.align.ppo import PPOTask
        return PPOTask(cfg)
    raise TrainError(f"config.task={cfg.task!r}: not an alignment task ({TASKS[1:]})")
