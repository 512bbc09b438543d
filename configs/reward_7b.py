"""Qwen-7B reward model (report §3.2.1): the pretrained (or SFT) 7B with a scalar head read at
the end token, pairwise loss, constant LR 3e-6, batch 64, sequence 2048, one epoch. The two
stages are two runs: preference-model pretraining (PMP) on large comparison data, then
finetuning on annotated pairs starting from the PMP run:

    python train.py --config configs/reward_7b.py --config.data.source=pmp.jsonl \\
        --config.num_train_steps=<pairs / 64> --workdir runs/rm_pmp
    python train.py --config configs/reward_7b.py --config.init_from=runs/rm_pmp \\
        --config.data.source=pairs.jsonl --config.num_train_steps=<pairs / 64> \\
        --workdir runs/rm_7b

Pairs: JSONL {"prompt", "chosen", "rejected"} (text or ChatML messages) or the Anthropic HH
layout (qwen_jax/align/data.py); every 20th pair is held out for eval_accuracy unless
data.eval_source is given.
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "reward"
    c.model = "7b"
    c.init_from = "checkpoints/qwen-7b"
    c.data.source = "pairs.jsonl"
    c.data.seq_len = 2048
    c.global_batch_size = 64
    c.mesh = (1, -1, 1)
    c.model_overrides.remat_policy = "minimal"
    c.optimizer.peak_learning_rate = 3e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.final_lr_fraction = 1.0  # constant
    c.num_train_steps = 1000  # one epoch: the number of pairs / 64
    c.eval_every_steps = 200
    c.eval_steps = 50
    c.checkpoint_every_steps = 200
    return c
