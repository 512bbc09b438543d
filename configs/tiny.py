"""The CPU demo: a small Qwen (hidden 128, 2 layers, 0.5M parameters) trained on the Python
standard library sources of the running interpreter, with the byte-level tokenizer (the same
run on every machine). 1200 steps of 8 x 256 bytes take about 3 minutes on 2 CPU cores
(README.md: the time, the losses and a sample) and end with a model whose samples are
recognisably Python."""

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
    c.optimizer.peak_learning_rate = 1e-3
    c.optimizer.warmup_steps = 60
    c.num_train_steps = 1200
    c.log_every_steps = 50
    c.eval_every_steps = 600
    c.eval_steps = 4
    c.checkpoint_every_steps = 600
    return c
