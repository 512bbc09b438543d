"""DPO on CPU in a few minutes: the tiny Qwen (random start, or --config.init_from) against
its frozen copy on the generated `toy:digits` preference pairs; eval_accuracy (how often the
implicit reward prefers the held-out chosen reply) reaches >= 0.8.

    python train.py --config configs/dpo_tiny.py --workdir runs/dpo_tiny
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "dpo"
    c.model = "tiny"
    c.tokenizer = "bytes"
    c.model_overrides.dtype = "float32"
    c.model_overrides.remat_policy = "none"
    c.align.frozen_dtype = "float32"
    c.data.source = "toy:digits"
    c.data.seq_len = 32
    c.global_batch_size = 32
    c.optimizer.peak_learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.num_train_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.eval_steps = 0
    c.checkpoint_every_steps = 100
    return c
