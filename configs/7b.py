"""Qwen-7B pretraining (report Table 1, §2.4): as 1.8B with the 7B model; 2.4T tokens =
572,205 steps of 4M tokens. Mesh: FSDP across the slice, no tensor parallelism (7B's
activations fit with selective remat)."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "7b"
    c.data.seq_len = 2048
    c.global_batch_size = 2048
    c.mesh = (1, -1, 1)
    c.model_overrides.remat_policy = "minimal"
    c.num_train_steps = 572_205
    return c
