"""Qwen-14B pretraining (report Table 1, §2.4): 4M-token batches (2048 x 2048), peak LR 3e-4,
3.0T tokens = 715,256 steps. Mesh: FSDP across the slice with 4-way tensor parallelism within a
host (heads 40 and MLP 13696 both divide by 4); full remat keeps activations within HBM."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "14b"
    c.data.seq_len = 2048
    c.global_batch_size = 2048
    c.mesh = (1, -1, 4)
    c.model_overrides.remat_policy = "full"
    c.num_train_steps = 715_256
    return c
