"""Qwen-7B DPO from an SFT checkpoint on preference pairs: beta 0.1, sequence log-probs summed
over response tokens, the reference a frozen bfloat16 copy of the SFT model; the SFT
recipe's optimizer at a small constant learning rate.

    python train.py --config configs/dpo_7b.py --config.init_from=runs/sft_7b \\
        --config.data.source=pairs.jsonl --workdir runs/dpo_7b
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "dpo"
    c.model = "7b"
    c.init_from = "runs/sft_7b"
    c.data.source = "pairs.jsonl"
    c.data.seq_len = 2048
    c.global_batch_size = 64
    c.mesh = (1, -1, 1)
    c.align.dpo_beta = 0.1
    c.align.frozen_dtype = "bfloat16"
    c.model_overrides.remat_policy = "minimal"
    c.optimizer.peak_learning_rate = 5e-7
    c.optimizer.warmup_steps = 100
    c.optimizer.final_lr_fraction = 1.0
    c.num_train_steps = 2000
    c.eval_every_steps = 200
    c.eval_steps = 50
    c.checkpoint_every_steps = 200
    return c
