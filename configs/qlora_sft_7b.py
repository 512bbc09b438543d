"""Qwen-7B Q-LoRA: `lora_sft_7b` with the frozen base stored in NF4 (one float32 scale per 64
inputs of each output, quantised by qwix), dequantised layer by layer where it is used; the
adapters, embedding, norms and lm_head stay in full precision.

    python train.py --config configs/qlora_sft_7b.py \\
        --config.init_from=checkpoints/qwen-7b-chat --config.data.source=sft.jsonl \\
        --workdir runs/qlora_sft_7b
"""

from configs.lora_sft_7b import get_config as lora_config


def get_config():
    c = lora_config()
    c.lora.quant = "nf4"
    c.lora.quant_group = 64
    return c
