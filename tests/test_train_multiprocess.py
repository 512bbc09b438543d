"""Several train.py processes on this machine, as on a pod: 2 processes x 4 CPU devices
against 1 x 8 on the (2, 2, 2) mesh (CPU collectives through gloo), from a fresh workdir;
resuming on another process count; a kill -9 of one process, then a restart of the job.

Every process is started with its own id and ended by it; none outlives its test.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen_jax.io.checkpoint import latest_run_step, load_params

import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--config.data.seq_len=32", "--config.global_batch_size=8", "--config.mesh=(2,2,2)",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
          "--config.eval_every_steps=3", "--config.eval_steps=2"]


def launch(workdir, processes: int, *overrides, steps: int = STEPS,
           config: str = "configs/tiny.py", common=COMMON) -> list[subprocess.Popen]:
    """One job: `processes` train.py processes sharing 8 CPU devices between them."""
    port = runs.free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config),
               "--workdir", str(workdir), f"--config.num_train_steps={steps}", *common,
               *overrides]
        if processes > 1:
            cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                    f"--process_id={i}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=300) -> None:
    """Wait for every process of a job (`timeout` seconds for all together); on a timeout or
    a failure, the stderr of every process is in the message."""
    deadline = time.monotonic() + timeout
    outputs, late = [], False
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            late = True
            break
    if late:  # kill all, keep what each wrote
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() if i >= len(outputs) else outputs[i]
                   for i, p in enumerate(procs)]
    report = "\n".join(f"--- process {i} (exit {p.returncode}):\n{err[:2000]}\n...\n"
                       f"{err[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outputs)))
    assert not late, f"the job ran past {timeout} s\n{report}"
    assert all(p.returncode == 0 for p in procs), report


def train(workdir, processes, *overrides, steps=STEPS, timeout=300, **kwargs):
    finish(launch(workdir, processes, *overrides, steps=steps, **kwargs), timeout=timeout)


def logged(workdir, key="loss") -> dict[int, float]:
    """The last value logged for each step (a restarted run logs some steps again)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def params(workdir):
    return load_params(workdir, as_numpy=True)[0]


def assert_same_run(got_dir, want_dir, steps):
    got, want = logged(got_dir), logged(want_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=0, atol=1e-5)
    np.testing.assert_allclose(list(logged(got_dir, "eval_loss").values()),
                               list(logged(want_dir, "eval_loss").values()), rtol=0, atol=1e-5)
    a, b = params(got_dir), params(want_dir)
    for (path, x), y in zip(_leaves(a), [leaf for _, leaf in _leaves(b)]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=path)


def _leaves(tree):
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process with 8 devices, uninterrupted (run once per session)."""
    return runs.shared_by_workers(tmp_path_factory, "multiprocess_single",
                                  lambda folder: train(folder / "run", 1)) / "run"


@pytest.mark.slow
def test_two_processes_train_like_one(single, tmp_path):
    workdir = tmp_path / "run"
    procs = launch(workdir, 2)
    finish(procs)
    assert_same_run(workdir, single, STEPS)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == STEPS
    # one process wrote the metrics: every step once
    assert len([r for r in (workdir / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in r]) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(1, 2), (2, 1)])
def test_resume_on_another_process_count(single, tmp_path, first, second):
    workdir = tmp_path / "run"
    train(workdir, first, "--stop_at_step=3")
    assert latest_run_step(workdir) == 3
    train(workdir, second)
    assert_same_run(workdir, single, STEPS)


@pytest.mark.slow
def test_kill_one_process_then_restart_the_job(tmp_path):
    """kill -9 of process 1 after the first checkpoint; the job (both processes) is ended as
    a scheduler would and started again: it continues from the last complete checkpoint and
    ends where an uninterrupted run ends (of one process with the 8 devices: two processes
    train as one does, test_two_processes_train_like_one)."""
    steps, every = 30, ["--config.checkpoint_every_steps=5", "--config.eval_every_steps=0"]
    reference = tmp_path / "reference"
    train(reference, 1, *every, steps=steps)
    workdir = tmp_path / "run"
    procs = launch(workdir, 2, *every, steps=steps)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (workdir / "checkpoints").is_dir() and (latest_run_step(workdir) or 0) >= 5:
                break
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.02)
        else:
            raise AssertionError("no checkpoint within the time limit")
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    resumed_from = latest_run_step(workdir)
    assert 5 <= resumed_from < steps, "the kill came after the run had ended"
    train(workdir, 2, *every, steps=steps)
    got, want = logged(workdir), logged(reference)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)],
                               [want[s] for s in range(1, steps + 1)], rtol=0, atol=1e-5)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == steps


@pytest.mark.slow
def test_ppo_on_two_processes_runs_like_one(reward_tiny_run, tmp_path):
    """PPO (rollouts with the KV-cache sampler, four models, the value warm-up, then policy
    updates) on 2 processes x 4 devices logs what 1 process x 8 devices logs, and
    stopping both processes at step 2 (one value-only step, one policy update: both
    optimizers have state) and resuming the job ends in the same place."""
    steps = 4
    common = [f"--config.align.reward_model={reward_tiny_run[0]}", "--config.mesh=(2,2,2)",
              "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
              "--config.align.value_warmup_steps=1"]
    kwargs = dict(steps=steps, config="configs/ppo_tiny.py", common=common, timeout=600)
    single_dir, two_dir = tmp_path / "single", tmp_path / "two"
    train(single_dir, 1, **kwargs)
    train(two_dir, 2, "--stop_at_step=2", **kwargs)
    assert latest_run_step(two_dir) == 2
    assert logged(two_dir, "policy_updated") == {1: 0.0, 2: 1.0}
    train(two_dir, 2, **kwargs)
    for key in ("loss", "reward_mean", "kl", "entropy", "value_loss"):
        got, want = logged(two_dir, key), logged(single_dir, key)
        assert sorted(got) == sorted(want) == list(range(1, steps + 1)), key
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-4,
                                   atol=1e-5, err_msg=key)
    assert logged(single_dir, "policy_updated")[steps] == 1.0
