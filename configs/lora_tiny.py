"""LoRA on CPU in a minute or two: adapters of rank 8 on every projection of the tiny Qwen
(the release's targets c_attn, c_proj, w1, w2), the base frozen. The base is
`--config.init_from` (any run or checkpoint of the tiny model, e.g. the CPU demo's workdir)
or, without one, the seed's random model; the data is the standard-library stream of the
CPU demo.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/lora_tiny.py --config.init_from=runs/tiny \\
        --workdir runs/lora_tiny

Add `--config.lora.quant=nf4` (or int8, int4) for Q-LoRA on the same base.
"""

from configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.quant_group = 32  # divides the tiny model's head dimension (32)
    c.optimizer.peak_learning_rate = 1e-2
    c.optimizer.warmup_steps = 10
    c.num_train_steps = 300
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    return c
