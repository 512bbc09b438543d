"""A run's life beyond its steps: divergence, bad data found mid-run, a training workdir used
as a model (generate, chat, eval_ppl, export, init_from), and quiet start-up on CPU."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from qwen_jax.io.checkpoint import latest_run_step, load_params
from qwen_jax.train import loop as train_loop
from test_train_loop import tiny_config

import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cfg, workdir, **kwargs):
    return train_loop.train(cfg, workdir, config_json=cfg.to_json_best_effort(), **kwargs)


def strict_records(workdir):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def cli(*args, module=None, env_extra=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    cmd = [sys.executable] + (["-m", module] if module else []) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------- divergence
def diverging(**changes):
    cfg = tiny_config(num_train_steps=40, eval_every_steps=0, checkpoint_every_steps=1,
                      keep_checkpoints=2, **changes)
    cfg.data.seq_len = 32
    cfg.optimizer.peak_learning_rate = 1e6
    cfg.optimizer.warmup_steps = 20
    return cfg


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(train_loop.TrainError) as info:
        run(diverging(), tmp_path)
    message = str(info.value)
    assert "non-finite" in message and "last good checkpoint" in message
    bad_step = int(message.split(":")[0].split()[1])
    records = strict_records(tmp_path)  # strict JSON: NaN is null plus a flag
    flagged = [r for r in records if r.get("nonfinite")]
    assert flagged and all(r[k] is None for r in flagged for k in r["nonfinite"])
    newest = latest_run_step(tmp_path)
    assert newest is not None and newest < bad_step
    assert f"checkpoints/{newest}" in message
    params, _ = load_params(tmp_path, as_numpy=True)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
    assert not (tmp_path / "summary.json").exists()


def test_divergence_skip_counts_and_stops_after_the_limit(tmp_path):
    with pytest.raises(train_loop.TrainError, match=r"4 non-finite steps \(max_nonfinite_skips"
                                                    r"=3\)"):
        run(diverging(nonfinite="skip", max_nonfinite_skips=3), tmp_path)
    records = strict_records(tmp_path)
    assert max(r.get("nonfinite_steps", 0) for r in records) >= 4
    params, _ = load_params(tmp_path, as_numpy=True)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_bad_nonfinite_setting_is_one_message(tmp_path):
    with pytest.raises(train_loop.TrainError, match="config.nonfinite='ignore'"):
        run(tiny_config(nonfinite="ignore"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- bad data
def train_cli(workdir, *overrides):
    return cli(ROOT / "train.py", "--config", ROOT / "configs/tiny.py", "--workdir", workdir,
               "--config.data.seq_len=32", "--config.global_batch_size=4",
               "--config.num_train_steps=200", "--config.eval_every_steps=0",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=1", *overrides,
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i} " * 5}]}


def malformed_jsonl(d):
    return _jsonl(d / "docs.jsonl", [{"text": "x = 1\n" * 20}] * 3 + ['{"text": "broken']
                  + [{"text": "y = 2\n" * 20}] * 3)


def binary_file(d):
    (d / "corpus").mkdir()
    for i in range(3):
        (d / "corpus" / f"{i}.txt").write_text("print(1)\n" * 30)
    (d / "corpus" / "blob.txt").write_bytes(b"\x7fELF\x00\x01" * 50)
    return d / "corpus"


def unknown_role(d):
    return _jsonl(d / "chat.jsonl", [_chat(i) for i in range(3)]
                  + [{"messages": [{"role": "robot", "content": "beep"}]}])


def conversations_not_a_list(d):
    return _jsonl(d / "chat.jsonl", [_chat(i) for i in range(3)]
                  + [{"conversations": "not a list"}])


@pytest.mark.parametrize("kind, make, expected", [
    ("pretrain", malformed_jsonl, "docs.jsonl:4: malformed JSON line"),
    ("pretrain", binary_file, "blob.txt: binary data"),
    ("sft", unknown_role, "unknown role 'robot'"),
    ("sft", conversations_not_a_list, "the conversation must be a non-empty list"),
])
def test_bad_data_is_one_line_and_leaves_no_workdir(tmp_path, kind, make, expected):
    source = make(tmp_path)
    workdir = tmp_path / "run"
    result = train_cli(workdir, f"--config.data.kind={kind}", f"--config.data.source={source}")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if (workdir / "checkpoints").is_dir() and latest_run_step(workdir) is not None:
        load_params(workdir, as_numpy=True)  # failed later: the last checkpoint is intact
    else:
        assert not workdir.exists()  # failed before its first step: nothing written


def test_bad_data_after_resume_keeps_the_checkpoint(tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": f"n = {i}\n" * 30} for i in range(20)])
    workdir = tmp_path / "run"
    first = train_cli(workdir, f"--config.data.source={data}", "--stop_at_step=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before, _ = load_params(workdir, as_numpy=True)
    _jsonl(data, ["{not json"] * 20)
    result = train_cli(workdir, f"--config.data.source={data}")
    assert result.returncode == 1 and "docs.jsonl:" in result.stderr
    assert "Traceback" not in result.stderr
    assert latest_run_step(workdir) == 2
    after, _ = load_params(workdir, as_numpy=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_missing_config_file_is_one_line(tmp_path):
    result = cli(ROOT / "train.py", "--config", tmp_path / "nope.py", "--workdir", tmp_path / "w")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "nope.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------- using a run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4 (trained once per session)."""
    cfg = tiny_config(num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=0)
    return runs.shared_by_workers(tmp_path_factory, "lifecycle_trained",
                                  lambda folder: run(cfg, folder / "run")) / "run"


def test_workdir_and_step_load_as_checkpoints(trained):
    latest, config = load_params(trained, as_numpy=True)
    step4, _ = load_params(trained / "checkpoints" / "4", as_numpy=True)
    step2, _ = load_params(trained / "checkpoints" / "2", as_numpy=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, latest, step4)
    assert not np.array_equal(step2["lm_head"]["kernel"], step4["lm_head"]["kernel"])
    assert config.vocab_size == 512 and config.param_dtype == "float32"


def test_generate_chat_and_eval_ppl_on_a_workdir(trained, tmp_path):
    outs = []
    for ckpt in (trained, trained / "checkpoints" / "4"):
        result = cli("--checkpoint", ckpt, "--prompt", "def ", "--max-new-tokens", 8,
                     "--greedy", module="qwen_jax.generate", env_extra={"QWEN_TIKTOKEN": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "byte-level" in result.stderr  # the run's own tokenizer, recorded with it
        outs.append(result.stdout)
    assert outs[0] == outs[1]
    chat = subprocess.run([sys.executable, "-m", "qwen_jax.chat", "--checkpoint", str(trained),
                           "--max-new-tokens", "4"], input="hello\n", cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    ppl = cli("--checkpoint", trained, "--data", tmp_path / "doc.txt", "--lengths", "32,64",
              module="qwen_jax.eval_ppl")
    assert ppl.returncode == 0, ppl.stderr[-3000:]
    assert "| 32 " in ppl.stdout or "32" in ppl.stdout.splitlines()[0]
    held_out = cli("--checkpoint", trained / "checkpoints" / "4", "--data", "stdlib-validation",
                   "--lengths", "32,128", "--max-windows", 2, "--dynamic-ntk",
                   "--plot", tmp_path / "ppl.png", module="qwen_jax.eval_ppl")
    assert held_out.returncode == 0, held_out.stderr[-3000:]
    assert "trained length 64" in held_out.stderr  # the run's data.seq_len
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_export_then_import_is_bit_exact(trained, tmp_path):
    export = cli(ROOT / "convert_hf.py", "export", trained, tmp_path / "hf")
    assert export.returncode == 0, export.stderr[-3000:]
    imported = cli(ROOT / "convert_hf.py", "import", tmp_path / "hf", tmp_path / "ckpt")
    assert imported.returncode == 0, imported.stderr[-3000:]
    want, _ = load_params(trained, as_numpy=True)
    got, config = load_params(tmp_path / "ckpt", as_numpy=True)
    assert config.param_dtype == "float32"
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_init_from_a_workdir(trained, tmp_path):
    cfg = tiny_config(init_from=str(trained), model="", num_train_steps=1,
                      eval_every_steps=0)
    cfg.optimizer.warmup_steps = 10  # step 0's learning rate is 0: the weights stay as loaded
    run(cfg, tmp_path / "next")
    want, _ = load_params(trained, as_numpy=True)
    got, _ = load_params(tmp_path / "next", as_numpy=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_a_run_with_the_qwen_vocabulary_carries_it(tmp_path, qwen_tiktoken_path):
    cfg = tiny_config(tokenizer=str(qwen_tiktoken_path), num_train_steps=1,
                      eval_every_steps=0)
    cfg.model_overrides.vocab_size = 151936
    cfg.data.seq_len = 16
    run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "qwen.tiktoken").read_bytes() == qwen_tiktoken_path.read_bytes()
    export = cli(ROOT / "convert_hf.py", "export", tmp_path / "run", tmp_path / "hf")
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "qwen.tiktoken").is_file()


# ------------------------------------------------------------------------------- quiet on CPU
@pytest.mark.parametrize("command", [
    ["-c", "import qwen_jax, jax; print(jax.devices())"],
    [str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"), "--workdir", "{tmp}",
     "--config.num_train_steps=1", "--config.data.seq_len=16", "--config.eval_every_steps=0"],
], ids=["import", "train.py"])
def test_no_libtpu_noise_without_a_tpu(tmp_path, command):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    command = [c.replace("{tmp}", str(tmp_path / "run")) for c in command]
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(word in result.stderr for word in ("libtpu", "TPU", "E0000")), result.stderr


def test_metrics_are_strict_json(tmp_path):
    from qwen_jax.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, total_steps=2, initial_step=0)
    writer.write(1, {"loss": float("nan"), "grad_norm": math.inf, "learning_rate": 1e-3})
    writer.close()
    (record,) = strict_records(tmp_path)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "learning_rate": 1e-3,
                      "nonfinite": ["grad_norm", "loss"]}
