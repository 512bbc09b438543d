"""Qwen-7B-Chat supervised finetuning (report §3.1.2): ChatML conversations with the loss
masked on system and user turns, sequence 2048, batch 128, 4000 steps, LR warmed up over
1430 steps to a peak of 2e-6 (then the cosine to 10%), AdamW (0.9, 0.95, 1e-8), weight decay
0.1, dropout 0.1, clipping 1.0. Starts from a checkpoint imported by convert_hf.py:

    python convert_hf.py import Qwen/Qwen-7B checkpoints/qwen-7b
    python train.py --config configs/sft_7b.py --config.init_from=checkpoints/qwen-7b \\
        --config.data.source=sft.jsonl --workdir runs/sft_7b
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "7b"
    c.init_from = "checkpoints/qwen-7b"
    c.data.kind = "sft"
    c.data.source = "sft.jsonl"
    c.data.seq_len = 2048
    c.global_batch_size = 128
    c.mesh = (1, -1, 1)
    c.model_overrides.emb_dropout_prob = 0.1
    c.model_overrides.attn_dropout_prob = 0.1
    c.model_overrides.remat_policy = "minimal"
    c.optimizer.peak_learning_rate = 2e-6
    c.optimizer.warmup_steps = 1430
    c.num_train_steps = 4000
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 500
    return c
