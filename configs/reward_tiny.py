"""A reward model on CPU in about 20 seconds: the tiny Qwen with a scalar head learns the
`toy:digits` preference (of two random replies, the one with more digits is chosen) from
generated pairs, with the pairwise loss; eval_accuracy on held-out pairs reaches >= 0.9.
Its workdir is the reward model of configs/ppo_tiny.py.

    python train.py --config configs/reward_tiny.py --workdir runs/reward_tiny
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "reward"
    c.model = "tiny"
    c.tokenizer = "bytes"
    c.model_overrides.dtype = "float32"
    c.model_overrides.remat_policy = "none"
    c.data.source = "toy:digits"
    c.data.seq_len = 32
    c.global_batch_size = 32
    c.optimizer.peak_learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.num_train_steps = 150
    c.log_every_steps = 25
    c.eval_every_steps = 50
    c.eval_steps = 0  # every held-out pair
    c.checkpoint_every_steps = 50
    return c
