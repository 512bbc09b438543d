"""Qwen-7B-Chat PPO (report §3.2.2): the policy from the SFT model, its frozen copy as the
reference, the value model from the reward model, the frozen reward model; two responses per
query sampled with top-p 0.9; per-token reward -0.04 x KL plus the score normalised by a
running mean; policy LR 1e-6, value LR 5e-6, value-loss clipping 0.15, the value model alone
for the first 50 steps; a pretraining-gradient term (PPO-ptx) on a pretraining stream.
What the report does not give (gamma, lambda, clip, epochs, batch) follows TRL's defaults.

    python train.py --config configs/ppo_7b.py --config.init_from=runs/sft_7b \\
        --config.align.reward_model=runs/rm_7b --config.data.source=prompts.jsonl \\
        --config.align.ptx_source=pretrain.jsonl --workdir runs/ppo_7b
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.task = "ppo"
    c.model = "7b"
    c.init_from = "runs/sft_7b"
    c.data.source = "prompts.jsonl"  # JSONL {"prompt": text or ChatML messages}
    c.data.seq_len = 2048  # prompt (<= 1536 tokens) + response (512)
    c.global_batch_size = 64  # 32 prompts x 2 responses
    c.mesh = (1, -1, 1)
    c.model_overrides.remat_policy = "minimal"
    c.align.reward_model = "runs/rm_7b"
    c.align.frozen_dtype = "bfloat16"
    c.align.samples_per_prompt = 2
    c.align.max_new_tokens = 512
    c.align.top_p = 0.9
    c.align.kl_coef = 0.04
    c.align.reward_norm = "mean"
    c.align.clip_eps = 0.2
    c.align.value_clip = 0.15
    c.align.value_learning_rate = 5e-6
    c.align.value_warmup_steps = 50
    c.align.ppo_epochs = 1
    c.align.ppo_minibatches = 1
    c.align.ptx_coef = 0.1
    c.align.ptx_source = "pretrain.jsonl"
    c.align.ptx_batch_size = 64  # divisible by the data-parallel size of a pod slice
    c.optimizer.peak_learning_rate = 1e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.final_lr_fraction = 1.0
    c.num_train_steps = 1000
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 100
    return c
