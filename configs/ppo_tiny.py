"""PPO on CPU in about half a minute: the tiny Qwen policy (random start, or --config.init_from)
samples replies to `toy:digits` prompts and learns from the reward model of a reward_tiny
run, which prefers replies with more digits:

    python train.py --config configs/reward_tiny.py --workdir runs/reward_tiny
    python train.py --config configs/ppo_tiny.py --workdir runs/ppo_tiny \\
        --config.align.reward_model=runs/reward_tiny

reward_mean rises while the KL to the reference stays bounded (docs/alignment.md: the numbers).
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "ppo"
    c.model = "tiny"
    c.tokenizer = "bytes"
    c.model_overrides.dtype = "float32"
    c.model_overrides.remat_policy = "none"
    c.align.frozen_dtype = "float32"
    c.align.reward_model = ""  # the workdir of a reward_tiny run (required)
    c.align.max_new_tokens = 16
    c.align.value_learning_rate = 1e-3
    c.align.value_warmup_steps = 10
    c.align.reward_norm = "mean_std"  # the reward model's scores span about +-15
    c.align.ppo_epochs = 2
    c.align.ppo_minibatches = 2
    c.data.source = "toy:digits"
    c.data.seq_len = 32
    c.global_batch_size = 32  # 16 prompts x 2 samples
    c.optimizer.peak_learning_rate = 3e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.final_lr_fraction = 1.0  # constant
    c.num_train_steps = 80
    c.log_every_steps = 10
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 40
    return c
