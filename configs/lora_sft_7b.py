"""Qwen-7B LoRA finetuning with the original release's recipe (its finetune.py and
finetune_lora_*.sh): adapters of rank 64, alpha 16, dropout 0.05 on c_attn, c_proj, w1 and
w2; AdamW with LR 3e-4, beta2 0.95, weight decay 0.1, 1% warm-up then a cosine to 0;
sequences of 512 tokens; the release's labels (`data.loss_mask="release"`).

From the chat model the adapters alone train. From a base model the release also trains the
embedding and lm_head, so that the ChatML tokens are learnt:
`--config.lora.modules_to_save="('wte','lm_head')"`.

    python convert_hf.py import Qwen/Qwen-7B-Chat checkpoints/qwen-7b-chat
    python train.py --config configs/lora_sft_7b.py \\
        --config.init_from=checkpoints/qwen-7b-chat --config.data.source=sft.jsonl \\
        --workdir runs/lora_sft_7b
"""

from configs.sft_7b import get_config as sft_config


def get_config():
    c = sft_config()
    c.init_from = "checkpoints/qwen-7b-chat"
    c.data.seq_len = 512  # the release's model_max_length for LoRA
    c.data.loss_mask = "release"
    c.global_batch_size = 64
    c.model_overrides.emb_dropout_prob = 0.0
    c.model_overrides.attn_dropout_prob = 0.0
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.targets = ("c_attn", "c_proj", "w1", "w2")
    c.optimizer.peak_learning_rate = 3e-4
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    c.optimizer.final_lr_fraction = 0.0
    c.num_train_steps = 2000
    c.optimizer.warmup_steps = 20  # 1% of the steps
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 500
    return c
