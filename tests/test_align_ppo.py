"""PPO end to end on CPU (configs/ppo_tiny.py against a reward_tiny run): the reward rises with
the KL bounded, a stopped and resumed run logs exactly the uninterrupted run's metrics, the
policy is a language model like any run's, and bad reward models are one-line errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from qwen_jax.align.ppo import PPOTask, layout
from qwen_jax.io.checkpoint import load_params

import runs
from runs import records

def cli(*args):
    return runs.cli("train.py", *args)


def error_line(result) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def reward_run(reward_tiny_run):
    return reward_tiny_run[0]


@pytest.fixture(scope="module")
def ppo_run(reward_run, tmp_path_factory):
    return runs.shared_train(tmp_path_factory, "ppo_tiny", "ppo_tiny",
                             f"--config.align.reward_model={reward_run}")[0]


def test_layout_of_rollouts():
    eod = 9
    prompts = [[1, 2, 3], [4]]
    tokens = np.array([[5, 6, eod, eod], [7, 8, 7, 8]])  # row 0 stopped at eod, row 1 cut
    out = layout(prompts, tokens, np.array([3, 4]), np.array([1, 0]), prompt_len=4,
                 seq_len=8, eod=eod)
    np.testing.assert_array_equal(out["tokens"], [[eod, 1, 2, 3, 5, 6, eod, eod],
                                                  [eod, eod, eod, 4, 7, 8, 7, 8]])
    np.testing.assert_array_equal(out["segments"], [[0, 1, 1, 1, 1, 1, 1, 0],
                                                    [0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out["response"], [[0, 0, 0, 0, 1, 1, 1, 0],
                                                    [0, 0, 0, 0, 1, 1, 1, 1]])
    # The stopped row is scored at its own end token; the cut one at an appended one.
    np.testing.assert_array_equal(out["reward_segments"][0], [0, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["reward_segments"][1], [0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert out["reward_tokens"][1, 8] == eod


def _update_with_microbatches(k: int):
    """One PPO step (experience, 2 epochs x 2 minibatches with PPO-ptx) of ppo_tiny on fixed
    random weights and rollouts, its experience and gradients split into k row groups."""
    from configs.ppo_tiny import get_config
    cfg = get_config()
    cfg.microbatches = k
    cfg.align.value_warmup_steps = 0
    cfg.align.ptx_coef, cfg.align.ptx_source, cfg.align.ptx_batch_size = 0.5, "unused", 16
    task = PPOTask(cfg, load=False)
    rng = np.random.default_rng(0)
    b, t, p = cfg.global_batch_size, cfg.data.seq_len, task.prompt_len
    prompts = [rng.integers(3, 250, rng.integers(1, p + 1)).tolist() for _ in range(b)]
    n = rng.integers(1, cfg.align.max_new_tokens + 1, b)
    roll = layout(prompts, rng.integers(3, 250, (b, t)), n, (n % 2) * n, p, t, 0)
    ptx_tokens = rng.integers(3, 250, (16, t + 1)).astype(np.int32)
    ptx = {"inputs": ptx_tokens[:, :-1], "targets": ptx_tokens[:, 1:],
           "loss_mask": (rng.random((16, t)) < 0.8).astype(np.int32),
           "segment_ids": np.ones((16, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (16, t))}
    policy = task.trainer.random_params(jax.random.PRNGKey(1))
    value = task.value_trainer.random_params(jax.random.PRNGKey(2))
    task.reference = policy
    start = jax.device_get((policy, value))
    state = jax.jit(task._fresh, out_shardings=task.state_shardings())(policy, value)
    state, metrics = task.jit_update()(state, policy, value, roll, ptx, jax.random.PRNGKey(3))
    return jax.device_get(state), dict(jax.device_get(metrics), start=start[0],
                                       value_start=start[1])


def test_microbatches_give_the_whole_batch_update():
    """Gradient accumulation over row groups is exact: the token means are weighted by each
    group's share of the tokens (policy and value losses, and the ptx loss)."""
    (one, m1), (two, m2) = _update_with_microbatches(1), _update_with_microbatches(2)
    for key in ("policy_loss", "value_loss", "ptx_loss", "clip_fraction", "approx_kl",
                "grad_norm", "value_grad_norm", "reward_mean", "kl", "entropy"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert m1["ptx_loss"] > 0 and m1["policy_updated"] == 1
    # grad_norm above pins the gradients' scale (AdamW's update hides it); the updates pin
    # their direction (per tensor: AdamW magnifies float noise where a gradient is ~0).
    for a, b, start in ((one.params, two.params, m1["start"]),
                        (one.value_params, two.value_params, m1["value_start"])):
        def close(x, y, x0):
            assert np.linalg.norm(x - y) <= 1e-3 * np.linalg.norm(x - x0)
        jax.tree.map(close, a, b, start)


def test_ppo_raises_the_reward_with_the_kl_bounded(ppo_run):
    logs = [r for r in records(ppo_run) if "reward_mean" in r]
    assert logs[-1]["step"] == 80
    before = logs[0]  # step 10: the value model's warm-up, the policy is still the initial one
    assert before["policy_updated"] == 0.0 and before["kl"] == pytest.approx(0.0, abs=1e-4)
    after = logs[-3:]
    gain = np.mean([r["reward_mean"] for r in after]) - before["reward_mean"]
    print("reward_mean", [round(r["reward_mean"], 2) for r in logs], "kl",
          [round(r["kl"], 2) for r in logs], "reward_std", before["reward_std"])
    assert gain > 10.0 and gain > 3 * before["reward_std"], [r["reward_mean"] for r in logs]
    # Bounded: the KL of the last third of the run stays within its own range, no runaway.
    kls = [r["kl"] for r in logs[len(logs) // 3:]]
    assert max(kls) < 40.0 and max(kls[-3:]) < 1.5 * np.median(kls), kls
    for key in ("entropy", "policy_loss", "value_loss", "clip_fraction", "response_length",
                "reward_std"):
        assert all(np.isfinite(r[key]) for r in logs), key
    assert any(r["clip_fraction"] > 0 for r in logs)  # 2 epochs x 2 minibatches: clipping acts


def test_ppo_policy_loads_as_a_language_model(ppo_run):
    params, config = load_params(ppo_run)
    assert "lm_head" in params and config.hidden_size == 128


def test_ppo_resume_repeats_the_uninterrupted_run(reward_run, ppo_run, tmp_path):
    """The shared run cut back to its checkpoint at step 40 (what a run stopped or preempted
    after that checkpoint leaves behind) and started again logs exactly what the uninterrupted
    run logged from there to the end: policy, value model, both optimizers, the reward
    normalisation's moments, the sampler's and the prompts' state all come back."""
    resumed = tmp_path / "resumed"
    shutil.copytree(ppo_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "80")  # the records past 40: train.py drops them
    (resumed / "summary.json").unlink()
    result = cli("--config", "configs/ppo_tiny.py", f"--config.align.reward_model={reward_run}",
                 "--workdir", resumed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((resumed / "summary.json").read_text())["final_step"] == 80
    keys = ("loss", "reward_mean", "kl", "policy_loss", "value_loss", "entropy")
    a = {r["step"]: [r[k] for k in keys] for r in records(ppo_run) if "loss" in r}
    b = {r["step"]: [r[k] for k in keys] for r in records(resumed) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(10, 81, 10))
    for step in (50, 60, 70, 80):
        np.testing.assert_allclose(b[step], a[step], rtol=1e-5, atol=1e-6, err_msg=str(step))


def test_bad_reward_models_are_one_line_errors(reward_run, ppo_run, tmp_path):
    base = ["--config", "configs/ppo_tiny.py", "--config.num_train_steps=2"]
    cases = {
        "": "config.reward_model is empty",
        str(ppo_run): "not a reward model run",
        str(tmp_path / "missing"): "no such directory",
    }
    for i, (path, expected) in enumerate(cases.items()):
        workdir = tmp_path / f"w{i}"
        line = error_line(cli(*base, f"--config.align.reward_model={path}", "--workdir",
                              workdir))
        assert expected in line, line
        assert not workdir.exists()
    other, config = tmp_path / "other_reward", tmp_path / "one_layer.py"
    config.write_text("from configs.reward_tiny import get_config as tiny\n\n\n"
                      "def get_config():\n    c = tiny()\n"
                      "    c.model_overrides.num_hidden_layers = 1\n    return c\n")
    done = cli("--config", config, "--workdir", other, "--config.num_train_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    line = error_line(cli(*base, f"--config.align.reward_model={other}", "--workdir",
                          tmp_path / "w_other"))
    assert "a reward model of another model config" in line, line
    assert not (tmp_path / "w_other").exists()
