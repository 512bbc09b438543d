"""DPO on CPU in under a minute: the tiny Qwen (random start, or --config.init_from) against
its frozen copy on the generated `toy:digits` preference pairs, with reward_tiny's data,
batch and schedule; eval_accuracy (how often the implicit reward prefers the held-out chosen
reply) reaches >= 0.8.

    python train.py --config configs/dpo_tiny.py --workdir runs/dpo_tiny
"""

from configs.reward_tiny import get_config as reward_tiny


def get_config():
    c = reward_tiny()
    c.task = "dpo"
    c.align.frozen_dtype = "float32"
    return c
