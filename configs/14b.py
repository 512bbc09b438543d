"""Qwen-14B pretraining (report Table 1, §2.4): 4M-token batches (2048 x 2048), peak LR 3e-4,
3.0T tokens = 715,256 steps.

Mesh: FSDP across the whole slice, 8 microbatches of 256 sequences, full remat. This is the
layout that compiles for a v5p-64 slice (32 chips, `--topology v5:4x4x2`) at 37.5 of 95 GiB
per chip (docs/scaling.md); 4-way tensor parallelism with 4 microbatches needs 120.9 GiB
there, because the residual stream between layers is not sharded over 'tensor'."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "14b"
    c.data.seq_len = 2048
    c.global_batch_size = 2048
    c.microbatches = 8
    c.mesh = (1, -1, 1)
    c.model_overrides.remat_policy = "full"
    c.num_train_steps = 715_256
    return c
