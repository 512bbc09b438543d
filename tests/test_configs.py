"""Every configs/*.py loads, builds its model and optimizer, and carries the report's recipe."""

import importlib.util
import pathlib
import sys

import pytest

from qwen_jax.model.config import PRESETS
from qwen_jax.train import build as train_build
from qwen_jax.train.optim import OptimizerConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))


def load(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_expected_configs_exist():
    assert {"tiny", "1_8b", "7b", "14b", "72b", "sft_7b"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    cfg = load(name)
    model = train_build.model_config(cfg) if not cfg.init_from else PRESETS[cfg.model]
    OptimizerConfig(total_steps=cfg.num_train_steps, **dict(cfg.optimizer)).validate()
    assert len(cfg.mesh) == 3
    assert cfg.global_batch_size % cfg.microbatches == 0
    assert cfg.data.seq_len <= model.max_position_embeddings
    for key in ("num_train_steps", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "seed"):
        assert key in cfg


@pytest.mark.parametrize("name", ["1_8b", "7b", "14b", "72b"])
def test_pretraining_recipe(name):
    cfg = load(name)
    assert cfg.global_batch_size * cfg.data.seq_len == 2048 * 2048  # 4M tokens
    opt = cfg.optimizer
    assert (opt.peak_learning_rate, opt.b1, opt.b2, opt.eps) == (3e-4, 0.9, 0.95, 1e-8)
    assert (opt.weight_decay, opt.grad_clip_norm, opt.final_lr_fraction) == (0.1, 1.0, 0.1)
    assert cfg.model_overrides.dtype == "bfloat16"
    assert cfg.model_overrides.param_dtype == "float32"
    model = train_build.model_config(cfg)
    if cfg.mesh[2] > 1:  # tensor parallelism must divide heads and MLP width
        assert model.num_attention_heads % cfg.mesh[2] == 0
        assert model.mlp_width % cfg.mesh[2] == 0


def test_sft_recipe():
    cfg = load("sft_7b")
    assert cfg.data.kind == "sft" and cfg.init_from
    assert (cfg.global_batch_size, cfg.data.seq_len, cfg.num_train_steps) == (128, 2048, 4000)
    assert (cfg.optimizer.peak_learning_rate, cfg.optimizer.warmup_steps) == (2e-6, 1430)
    assert cfg.model_overrides.attn_dropout_prob == 0.1
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.grad_clip_norm == 1.0


@pytest.mark.parametrize("name", CONFIGS)
def test_alignment_keys_check(name):
    from qwen_jax.align.common import check_align_config

    check_align_config(load(name))  # every config's task and align keys are valid


def test_reward_recipe():
    cfg = load("reward_7b")
    opt = cfg.optimizer
    assert cfg.task == "reward" and cfg.init_from and cfg.model == "7b"
    assert (opt.peak_learning_rate, opt.warmup_steps, opt.final_lr_fraction) == (3e-6, 0, 1.0)
    assert (cfg.global_batch_size, cfg.data.seq_len) == (64, 2048)


def test_ppo_recipe():
    cfg = load("ppo_7b")
    a = cfg.align
    assert cfg.task == "ppo" and cfg.init_from and a.reward_model
    assert (a.samples_per_prompt, a.top_p, a.kl_coef, a.value_clip) == (2, 0.9, 0.04, 0.15)
    assert (cfg.optimizer.peak_learning_rate, a.value_learning_rate) == (1e-6, 5e-6)
    assert a.value_warmup_steps == 50 and a.reward_norm == "mean"
    assert a.ptx_coef > 0 and a.ptx_source and a.ptx_batch_size > 0
    assert (a.gamma, a.lam, a.clip_eps) == (1.0, 0.95, 0.2)


def test_dpo_recipe():
    cfg = load("dpo_7b")
    assert cfg.task == "dpo" and cfg.init_from and cfg.align.dpo_beta == 0.1
