"""train.py end to end: exact resume, preemption, kill during a save, resharding on restore,
and bad input (the README's main command runs in tests/test_docs.py)."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qwen_jax.train import build as train_build
from qwen_jax.train import loop as train_loop
from qwen_jax.train.checkpoint import TrainCheckpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/*.py import configs.base


def tiny_config(**changes):
    spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.seq_len = 64
    cfg.global_batch_size = 8
    cfg.num_train_steps = 6
    cfg.log_every_steps = 1
    cfg.eval_every_steps = 3
    cfg.eval_steps = 2
    cfg.checkpoint_every_steps = 3
    cfg.mesh = (1, -1, 1)
    for key, value in changes.items():
        target = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


def run(cfg, workdir, **kwargs):
    return train_loop.train(cfg, workdir, config_json=cfg.to_json_best_effort(), **kwargs)


def losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def final_state(workdir, cfg, step):
    trainer = train_build.build(cfg).trainer
    ckpt = TrainCheckpointer(pathlib.Path(workdir) / "checkpoints")
    state, data_state = ckpt.restore(step, trainer.abstract_state())
    ckpt.close()
    return jax.device_get(state), data_state


def test_resume_is_bitwise_identical(tmp_path):
    cfg = tiny_config()
    straight = run(cfg, tmp_path / "straight")
    assert straight["final_step"] == 6
    first = run(cfg, tmp_path / "resumed", stop_at_step=3)
    assert first["final_step"] == 3
    second = run(cfg, tmp_path / "resumed")
    assert second["final_step"] == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a, data_a = final_state(tmp_path / "straight", cfg, 6)
    b, data_b = final_state(tmp_path / "resumed", cfg, 6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert data_a == data_b
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
               .splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "step_seconds",
            "tflops_per_device"} <= set(records[0])
    assert "mfu" not in records[0]  # CPU: unknown peak, so no MFU rather than a wrong one
    assert any("eval_loss" in r for r in records)
    assert (tmp_path / "straight" / "tensorboard").is_dir()
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["checkpoint_seconds"] >= 0


def test_restore_onto_another_mesh(tmp_path):
    cfg = tiny_config(mesh=(1, -1, 1))
    run(cfg, tmp_path / "a", stop_at_step=3)
    resharded = tiny_config(mesh=(2, 2, 2))
    summary = run(resharded, tmp_path / "a")
    assert summary["final_step"] == 6
    run(cfg, tmp_path / "b")
    got, want = losses(tmp_path / "a"), losses(tmp_path / "b")
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                               atol=1e-4)


def _train_cmd(workdir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), "--config.data.seq_len=64",
            "--config.global_batch_size=8", *overrides]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait_for_metrics(workdir, proc, lines, timeout=120):
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training made no progress")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "--config.num_train_steps=100000",
                                       "--config.log_every_steps=1",
                                       "--config.checkpoint_every_steps=100000"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_metrics(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preempted"] and summary["final_step"] >= 3
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == summary["final_step"]
    ckpt.close()


@pytest.mark.slow
def test_kill_during_async_save_leaves_previous_checkpoint(tmp_path):
    """SIGKILL while a checkpoint is being written (saving every step, so a kill almost always
    lands in one; retried until it does): the previous complete checkpoint restores and
    training resumes from it."""
    for attempt in range(3):
        workdir = tmp_path / f"attempt{attempt}"
        proc = subprocess.Popen(_train_cmd(workdir, "--config.num_train_steps=100000",
                                           "--config.log_every_steps=1",
                                           "--config.checkpoint_every_steps=1"),
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _wait_for_metrics(workdir, proc, 4)
        proc.kill()  # SIGKILL: no handler runs
        proc.communicate(timeout=60)
        partial = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
        if partial:
            break
    assert partial, "no kill landed during a save in 3 attempts"
    ckpt = TrainCheckpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and step < int(partial[0].split(".")[0])
    state, data_state = final_state(workdir, tiny_config(), step)
    assert int(state.step) == step and data_state is not None
    result = subprocess.run(_train_cmd(workdir, f"--config.num_train_steps={step + 2}",
                                       "--config.log_every_steps=1"),
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((workdir / "summary.json").read_text())["final_step"] == step + 2


@pytest.mark.parametrize("overrides, message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.mesh=(3,1,1)"], "does not match the 8 devices"),
    (["--config.mesh=(1,-1,1)", "--config.global_batch_size=12"],
     "global_batch_size=12 must split"),
    (["--config.data.source=/no/such/corpus"], "/no/such/corpus"),
    (["--config.model_overrides.dtype=float64"], "dtype='float64'"),
    (["--config.model_overrides.hidden_size=96"], "hidden_size"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    result = subprocess.run(_train_cmd(workdir, "--config.num_train_steps=2", *overrides),
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run(tiny_config(num_train_steps=1), tmp_path)
    other = tiny_config(num_train_steps=2)
    other.model_overrides.num_hidden_layers = 3
    with pytest.raises(train_loop.TrainError, match="another model config"):
        run(other, tmp_path)


def test_sft_from_imported_checkpoint(tmp_path, ref_vectors_dir):
    """SFT (loss on assistant turns only) starting from a checkpoint made by convert_hf.py:
    the first step's loss is the imported model's loss on the first batch."""
    from qwen_jax.io.checkpoint import save_checkpoint
    from qwen_jax.io.convert import load_hf_config, load_hf_params
    from qwen_jax.model.transformer import Qwen

    config = load_hf_config(ref_vectors_dir, "float32")
    save_checkpoint(tmp_path / "ckpt", load_hf_params(ref_vectors_dir, config), config)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
            for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_config(model="", init_from=str(tmp_path / "ckpt"), tokenizer="bytes",
                      num_train_steps=4, eval_every_steps=0)
    cfg.data.kind = "sft"
    cfg.data.source = str(tmp_path / "sft.jsonl")
    cfg.data.seq_len = 128
    cfg.model_overrides.attn_dropout_prob = 0.0
    cfg.model_overrides.emb_dropout_prob = 0.0
    cfg.optimizer.peak_learning_rate = 1e-3
    cfg.optimizer.warmup_steps = 0
    summary = run(cfg, tmp_path / "run")
    assert summary["final_step"] == 4

    built = train_build.build(cfg)
    batch = next(built.train_data)
    assert 0 < batch["loss_mask"].sum() < batch["loss_mask"].size  # user turns masked
    model = Qwen(built.model_config)
    params = load_hf_params(ref_vectors_dir, config)
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], train=True,
                         rngs={"dropout": jax.random.PRNGKey(0)})[0]
    logz = jax.nn.logsumexp(logits, -1)
    nll = logz - np.take_along_axis(np.asarray(logits), batch["targets"][..., None], -1)[..., 0]
    expected = float((nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    assert losses(tmp_path / "run")[1] == pytest.approx(expected, abs=2e-3)
