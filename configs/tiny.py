"""The CPU demo: a small Qwen trained on the Python standard library sources of the running
interpreter, with the byte-level tokenizer when no Qwen vocabulary is around. On 2 CPU cores
the loss visibly falls within a few minutes."""

from configs.base import base_config


def get_config():
    c = base_config()
    c.model = "tiny"
    c.tokenizer = "bytes"  # the same run everywhere, whatever vocabulary a machine has
    c.model_overrides.dtype = "float32"
    c.model_overrides.remat_policy = "none"
    c.data.seq_len = 256
    c.data.source = "stdlib"
    c.global_batch_size = 8
    c.optimizer.peak_learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.num_train_steps = 300
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.eval_steps = 4
    c.checkpoint_every_steps = 100
    return c
