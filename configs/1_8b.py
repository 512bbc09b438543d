"""Qwen-1.8B pretraining (report Table 1, §2.4): peak LR 3e-4, 4M-token batches of 2048 x 2048,
AdamW (0.9, 0.95, 1e-8), weight decay 0.1, warmup then cosine to 10%, clipping 1.0, bfloat16
compute over float32 master weights. 2.2T tokens = 524,288 steps of 4M tokens.

Mesh: FSDP over the whole slice (data, fsdp, tensor) = (1, -1, 1); 1.8B needs no tensor
parallelism."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "1_8b"
    c.data.seq_len = 2048
    c.global_batch_size = 2048
    c.mesh = (1, -1, 1)
    c.model_overrides.remat_policy = "minimal"
    c.num_train_steps = 524_288
    return c
