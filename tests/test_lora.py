"""LoRA and Q-LoRA (qwen_jax.model.lora): the adapters add exactly scale * A @ B to the right
projections, a merged model computes what the adapted one computes, a training step moves
only the adapters (and modules_to_save) and keeps optimizer state for them only, and on the
CPU a LoRA and a Q-LoRA run of configs/lora_tiny.py lower the held-out loss of a trained base;
their workdirs load merged like any run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.lora_tiny import get_config as lora_tiny_config
from qwen_jax.io.checkpoint import load_params
from qwen_jax.model import lora
from qwen_jax.model.config import ConfigError, preset
from qwen_jax.model.transformer import Qwen, init_params
from qwen_jax.train.build import build_trainer

import runs
from runs import one_error_line, records

TINY = preset("tiny")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _with_random_b(params, seed=1):
    """Adapters with a non-zero B (a fresh one is 0: the base function)."""
    key = jax.random.PRNGKey(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.fold_in(key, hash(
            jax.tree_util.keystr(path)) % 2**31), x.shape)
        if path[-1].key == lora.LORA_B else x, params)


def _logits(params, config):
    return Qwen(config).apply({"params": params}, TOKENS)[0]


@pytest.mark.parametrize("targets, rslora", [
    (("c_attn", "c_proj", "w1", "w2"), False),
    (("c_attn",), True),
    (("attn.c_proj", "w2"), False),
    (("mlp.c_proj", "w1"), False),
])
def test_adapters_sit_where_targeted_and_merge_exactly(targets, rslora):
    config = TINY.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets,
                          lora_rslora=rslora)
    params = _with_random_b(init_params(config, jax.random.PRNGKey(0)))
    adapted = {k.rsplit("/", 1)[0] for k in _flat(params) if k.endswith(lora.LORA_A)}
    want = {"c_attn": "layers/attn/c_attn_lora", "attn.c_proj": "layers/attn/o/lora",
            "mlp.c_proj": "layers/mlp/down/lora", "w1": "layers/mlp/up/lora",
            "w2": "layers/mlp/gate/lora"}
    assert adapted == {want[t] for t in lora.expand_targets(targets)}
    merged, plain = lora.merge(jax.device_get(params), config)
    assert plain.lora_rank == 0 and not lora.has_adapters(merged)
    assert set(_flat(merged)) == set(_flat(init_params(TINY, jax.random.PRNGKey(0))))
    np.testing.assert_allclose(_logits(merged, plain), _logits(params, config), atol=2e-5)
    # the adapters changed the function: a merge that dropped them would fail above
    base = {k: v for k, v in _flat(params).items() if "lora" not in k}
    assert not np.allclose(_logits(traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in base.items()}), TINY), _logits(params, config),
        atol=1e-3)


def test_one_adapter_by_hand():
    """w2 (mlp/gate) with rank 2: gate(x) = x W + (alpha / r) x A B, computed here directly."""
    config = TINY.replace(lora_rank=2, lora_alpha=3.0, lora_targets=("w2",),
                          num_hidden_layers=1)
    params = _with_random_b(init_params(config, jax.random.PRNGKey(0)))
    layer = jax.tree.map(lambda x: x[0], params["layers"])
    gate = layer["mlp"]["gate"]
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 3, TINY.hidden_size))
    from qwen_jax.model.layers import Einsum
    got = Einsum("bth,hf->btf", (TINY.hidden_size, TINY.mlp_width), ("embed", "mlp"), config,
                 target="w2").apply({"params": gate}, x)
    want = x @ gate["kernel"] + 1.5 * (x @ gate["lora"]["lora_a"]) @ gate["lora"]["lora_b"]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("quant, group, bound", [("int8", 64, 0.02), ("int4", 32, 0.4),
                                                 ("nf4", 32, 0.4)])
def test_quantised_base_merges_and_stays_close(quant, group, bound):
    """A Q-LoRA model computes its merged (dequantised) model's logits; the quantised base
    stays near the float one (the bound is loose: the logit KL is stated in docs/training.md)."""
    config = TINY.replace(lora_rank=4, base_quant=quant, base_quant_group=group)
    plain = init_params(TINY, jax.random.PRNGKey(0))
    fresh = init_params(config, jax.random.PRNGKey(5))
    params = jax.jit(lambda p, f: lora.attach(p, f, config))(plain, fresh)
    kernels = [k for k in _flat(params) if k.endswith(lora.QUANT_KERNEL)]
    assert len(kernels) == 7 and all(_flat(params)[k].dtype == (
        jnp.int8 if quant == "int8" else jnp.int4) for k in kernels)
    merged, merged_config = lora.merge(jax.device_get(params), config)
    np.testing.assert_allclose(_logits(merged, merged_config), _logits(params, config),
                               atol=1e-5)
    assert np.max(np.abs(_logits(params, config) - _logits(plain, TINY))) < bound


def test_config_errors():
    with pytest.raises(ConfigError, match="lora_targets"):
        TINY.replace(lora_rank=4, lora_targets=("c_fc",))
    with pytest.raises(ConfigError, match="base_quant"):
        TINY.replace(base_quant="nf4")
    with pytest.raises(ConfigError, match="base_quant_group"):
        TINY.replace(lora_rank=4, base_quant="nf4", base_quant_group=64)  # head dim 32


def _config(**lora_fields):
    cfg = lora_tiny_config()
    cfg.mesh = (1, -1, 1)
    cfg.global_batch_size = 8
    cfg.data.seq_len = 16
    cfg.optimizer.warmup_steps = 0  # a learning rate > 0 at the first step
    for k, v in lora_fields.items():
        cfg.lora[k] = v
    return cfg


@pytest.mark.parametrize("saved", [(), ("wte", "lm_head")])
def test_a_step_trains_only_the_adapters(saved):
    cfg = _config(modules_to_save=saved, dropout=0.0)
    trainer = build_trainer(cfg)
    state = trainer.init_state(jax.random.PRNGKey(0))
    before = _flat(jax.device_get(state.params))
    opt_paths = {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                          for k in p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((8, 16), np.float32)}
    state, metrics = trainer.jit_train_step()(state, batch, jax.random.PRNGKey(1))
    after = _flat(jax.device_get(state.params))
    trains = {k for k in before if "lora" in k or k.split("/")[0] in
              {lora.SAVED_MODULES[m] for m in saved}}
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        if key in trains and key.endswith(lora.LORA_A):
            continue  # A's gradient is 0 while B is 0 (the first step)
        assert changed == (key in trains), key
    # optimizer moments exist for what trains only
    moment_paths = {p.split("/mu/", 1)[1] for p in opt_paths if "/mu/" in p}
    assert moment_paths == trains
    assert float(metrics["grad_norm"]) > 0


def test_lora_runs_only_with_language_model_tasks(tmp_path):
    result = runs.train("reward_tiny", tmp_path / "w", "--config.lora.rank=4")
    assert "config.lora.rank=4" in one_error_line(result.stderr)
    assert not (tmp_path / "w").exists()
    result = runs.train("lora_tiny", tmp_path / "w", "--config.lora.targets=('qkv',)")
    assert "lora_targets" in one_error_line(result.stderr)
    result = runs.train("lora_tiny", tmp_path / "w", "--config.lora.modules_to_save=('head',)")
    assert "modules_to_save" in one_error_line(result.stderr)
    assert not (tmp_path / "w").exists()


SHORT = ("--config.data.seq_len=128",)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 200-step tiny run on 128-byte sequences (half the demo's: the LoRA runs below show
    the same as at 256, in under half the time)."""
    return runs.shared_train(tmp_path_factory, "lora_base", "tiny", *SHORT,
                             "--config.num_train_steps=200", "--config.eval_every_steps=200",
                             "--config.checkpoint_every_steps=200")[0]


def _eval_losses(workdir):
    return {r["step"]: r["eval_loss"] for r in records(workdir) if "eval_loss" in r}


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_lora_tiny_lowers_the_loss_of_a_trained_base(base_run, tmp_path, quant):
    base_eval = _eval_losses(base_run)[200]
    workdir = tmp_path / "run"
    result = runs.train("lora_tiny", workdir, f"--config.init_from={base_run}", *SHORT,
                        f"--config.lora.quant={quant}", "--config.num_train_steps=100",
                        "--config.eval_every_steps=100", "--config.checkpoint_every_steps=100")
    assert result.returncode == 0, result.stderr[-3000:]
    after = _eval_losses(workdir)[100]
    print(f"{quant}: base eval_loss {base_eval:.4f} -> {after:.4f} after 100 LoRA steps")
    assert after < base_eval - 0.03
    # merged on load: the plain model of the run computes the adapted model's logits
    params, config = load_params(workdir)
    assert config.lora_rank == 0 and not lora.has_adapters(params)
    assert set(_flat(params)) == set(_flat(load_params(base_run)[0]))
    base_params, _ = load_params(base_run)
    moved = [k for k, v in _flat(params).items()
             if not np.allclose(v, _flat(base_params)[k], atol=1e-7)]
    assert moved and all(k.startswith("layers/") for k in moved)
    result = runs.cli("--checkpoint", workdir, "--prompt", "def ", "--max-new-tokens", "8",
                      module="qwen_jax.generate")
    assert result.returncode == 0, result.stderr[-3000:]


def test_dpo_trains_a_lora_policy(tmp_path):
    """DPO with the policy's adapters only (the reference is the base: B = 0)."""
    workdir = tmp_path / "dpo"
    result = runs.train("dpo_tiny", workdir, "--config.lora.rank=8", "--config.lora.dropout=0",
                        "--config.num_train_steps=20", "--config.eval_every_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["eval_accuracy"] for r in records(workdir) if "eval_accuracy" in r]
    assert evals[-1] >= 0.8, evals


def test_ppo_trains_a_lora_policy(reward_tiny_run, tmp_path):
    """PPO with a LoRA policy: the value and reward models stay full models."""
    workdir = tmp_path / "ppo"
    result = runs.train("ppo_tiny", workdir, "--config.lora.rank=8",
                        f"--config.align.reward_model={reward_tiny_run[0]}",
                        "--config.num_train_steps=12", "--config.align.value_warmup_steps=4",
                        "--config.log_every_steps=4", "--config.checkpoint_every_steps=12")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in records(workdir) if "policy_updated" in r]
    assert [r["policy_updated"] for r in logged] == [0.0, 1.0, 1.0]
    assert logged[-1]["grad_norm"] > 0
    params, config = load_params(workdir)
    assert config.lora_rank == 0 and "lm_head" in params


def test_sft_trains_a_lora_model_with_the_release_labels(base_run, tmp_path):
    """LoRA SFT on ChatML conversations with the release's labels (`lora_sft_7b`'s setting),
    from a trained base: the training loss falls."""
    import json
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
            for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    workdir = tmp_path / "run"
    result = runs.train("lora_tiny", workdir, f"--config.init_from={base_run}",
                        "--config.data.kind=sft", f"--config.data.source={tmp_path}/sft.jsonl",
                        "--config.data.loss_mask=release", "--config.data.seq_len=128",
                        "--config.num_train_steps=60", "--config.log_every_steps=10",
                        "--config.eval_every_steps=0", "--config.checkpoint_every_steps=60")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in records(workdir) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
