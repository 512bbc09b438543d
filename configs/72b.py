"""Qwen-72B pretraining with the report's recipe (4M-token batches, peak LR 3e-4; the report
gives no token count for 72B, so num_train_steps is a setting). Mesh: FSDP across the slice,
8-way tensor parallelism (64 heads, MLP 24576) within a host; full remat; batches reached by
4 microbatches of gradient accumulation."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "72b"
    c.data.seq_len = 2048
    c.global_batch_size = 2048
    c.microbatches = 4
    c.mesh = (1, -1, 8)
    c.model_overrides.remat_policy = "full"
    c.num_train_steps = 715_256
    return c
