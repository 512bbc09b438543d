"""Defaults shared by every training config (report §2.4, Table 1).

Each config file's get_config() starts from `base_config()` and changes what differs. Keys:
model (a preset name), model_overrides, init_from (a checkpoint from convert_hf.py), data,
tokenizer, mesh (data, fsdp, tensor; -1 = fill), global_batch_size (sequences per step),
microbatches (gradient accumulation), optimizer, and the loop's step counts.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "tiny"
    # Any QwenConfig field: dtype, param_dtype, remat_policy, attention_impl, scan_layers, ...
    c.model_overrides = ml_collections.ConfigDict({
        "dtype": "bfloat16",  # compute
        "param_dtype": "float32",  # master weights
        "remat_policy": "minimal",
        "attention_impl": "auto",
        "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
    })
    c.init_from = ""  # a qwen_jax checkpoint dir (convert_hf.py import) to start from
    c.tokenizer = ""  # qwen.tiktoken path; "" = the init_from dir, $QWEN_TIKTOKEN, or bytes

    c.data = ml_collections.ConfigDict({
        "kind": "pretrain",  # or "sft"
        "source": "stdlib",  # "stdlib" or file/dir/glob paths, comma-separated
        "eval_source": "",  # "" = the validation split of `source` (stdlib) or none
        "text_field": "text",
        "seq_len": 2048,
        "num_workers": 0,
        "packing": True,  # SFT: pack conversations (False: pad each to seq_len)
        "loss_mask": "assistant",  # SFT: "assistant" (replies only) or "release" (finetune.py's)
    })

    c.mesh = (1, -1, 1)
    c.global_batch_size = 2048  # sequences; x seq_len 2048 = 4M tokens (report)
    c.microbatches = 1

    c.optimizer = ml_collections.ConfigDict({
        "peak_learning_rate": 3e-4,
        "warmup_steps": 2000,
        "final_lr_fraction": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "grad_clip_norm": 1.0,
    })

    # The lm_head + cross-entropy fused and chunked (qwen_jax/model/loss.py): the float32
    # [tokens, vocab] logits are never materialised. z_loss / label_smoothing: training only.
    c.loss = ml_collections.ConfigDict({
        "fused": True,
        "chunk_tokens": 4096,
        "z_loss": 0.0,
        "label_smoothing": 0.0,
    })

    # LoRA / Q-LoRA (qwen_jax/model/lora.py): rank 0 = full training. Adapters on `targets`
    # (the release's module names), the base frozen; `modules_to_save` ("wte", "lm_head")
    # train fully. `quant`: the frozen base stored "int8", "int4" or "nf4" (Q-LoRA).
    c.lora = ml_collections.ConfigDict({
        "rank": 0,
        "alpha": 16.0,
        "dropout": 0.05,
        "targets": ("c_attn", "c_proj", "w1", "w2"),
        "rslora": False,
        "modules_to_save": (),
        "quant": "none",
        "quant_group": 64,
    })

    # What is trained: "lm" (next-token: pretraining, SFT), "reward" (a reward model on
    # preference pairs), "dpo", "ppo" (qwen_jax/align; the keys below).
    c.task = "lm"
    c.align = ml_collections.ConfigDict({
        "toy_size": 4096,  # pairs / prompts of the generated `toy:digits` source
        "frozen_dtype": "bfloat16",  # the frozen models (reference, reward) of DPO and PPO
        "dpo_beta": 0.1,
        # PPO (report §3.2.2): the reward model run (task=reward) that scores responses and
        # initialises the value model; rollouts: samples_per_prompt responses per prompt,
        # global_batch_size responses per step, max_new_tokens each (data.seq_len holds
        # prompt + response).
        "reward_model": "",
        "samples_per_prompt": 2,
        "max_new_tokens": 512,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 0,
        "kl_coef": 0.04,  # per-token reward -kl_coef * KL(policy || reference)
        "kl_kind": "kl",  # kl | abs | mse | low_var_kl
        "reward_norm": "mean",  # running normalisation of scores: none | mean | mean_std
        "gamma": 1.0,
        "lam": 0.95,
        "whiten_advantages": True,
        "clip_eps": 0.2,
        "value_clip": 0.15,
        "value_learning_rate": 5e-6,  # the policy's is optimizer.peak_learning_rate
        "value_warmup_steps": 50,  # steps that update the value model only
        "ppo_epochs": 1,
        "ppo_minibatches": 1,
        # PPO-ptx: + ptx_coef x next-token loss on batches of ptx_source (a pretraining
        # source as data.source takes), ptx_batch_size sequences of data.seq_len.
        "ptx_coef": 0.0,
        "ptx_source": "",
        "ptx_batch_size": 0,
    })

    c.seed = 0
    c.num_train_steps = 500_000
    c.log_every_steps = 10
    c.eval_every_steps = 1000
    c.eval_steps = 20
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # A step with a non-finite loss or gradient never changes the state. "stop": exit
    # non-zero naming the step and the last good checkpoint; "skip": go on, and stop once
    # more than max_nonfinite_skips steps were skipped.
    c.nonfinite = "stop"
    c.max_nonfinite_skips = 10
    return c
