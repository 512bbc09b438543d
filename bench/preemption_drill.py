"""Preemption drill: kill a training run with SIGKILL at random moments (start-up, mid-step,
mid-save), restart it each time, and check that every run that completes logged the same
losses as an uninterrupted run, bit for bit, and ends with the same parameters.

    python bench/preemption_drill.py [--kills 10] [--steps 40] [--seed 0]

Each kill is classified by what the workdir showed at that moment: "start-up" (no step
logged yet by this attempt), "mid-save" (an Orbax step directory still under its temporary
name) or "mid-step". A run that completes before all kills are spent is checked, and the
drill goes on with a fresh one. Prints one line per attempt and a verdict; exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def command(workdir, steps):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), f"--config.num_train_steps={steps}",
            "--config.data.seq_len=64", "--config.global_batch_size=8",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
            "--config.eval_every_steps=0"]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1")


def logged_losses(workdir) -> dict[int, float]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if "loss" in record:
                out[record["step"]] = record["loss"]
    return out


def wait_for_lines(workdir, lines_before: int, proc) -> float:
    """Seconds from now until the run logs a new line (or ends)."""
    start, path = time.perf_counter(), pathlib.Path(workdir) / "metrics.jsonl"
    while proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) > lines_before:
            break
        time.sleep(0.01)
    return time.perf_counter() - start


def phase(workdir, lines_before: int) -> str:
    ckpts = pathlib.Path(workdir) / "checkpoints"
    if ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir()):
        return "mid-save"
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = len(path.read_text().splitlines()) if path.exists() else 0
    return "start-up" if lines <= lines_before else "mid-step"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="preemption-drill-"))
    try:
        reference = scratch / "reference"
        t0 = time.perf_counter()
        proc = subprocess.Popen(command(reference, args.steps), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        startup = wait_for_lines(reference, 0, proc)
        if proc.wait() != 0:
            raise SystemExit("the uninterrupted run failed")
        duration = time.perf_counter() - t0
        print(f"uninterrupted run: {args.steps} steps in {duration:.1f} s, the first after "
              f"{startup:.1f} s")

        from qwen_jax.io.checkpoint import latest_run_step, load_params  # noqa: E402

        want_losses = logged_losses(reference)
        want_params = jax.tree_util.tree_leaves(load_params(reference, as_numpy=True)[0])

        def same_as_reference(workdir) -> tuple[bool, bool]:
            got = jax.tree_util.tree_leaves(load_params(workdir, as_numpy=True)[0])
            return (logged_losses(workdir) == want_losses,
                    all(np.array_equal(x, y) for x, y in zip(got, want_params)))

        kills, attempts, phases, runs, failures = 0, 0, {}, 0, 0
        while True:
            workdir = scratch / f"drilled{runs}"
            run_kills = 0
            while True:  # one run, killed and restarted until it completes
                attempts += 1
                resume = (latest_run_step(workdir) if (workdir / "checkpoints").is_dir()
                          else None) or 0
                if resume >= args.steps:
                    break  # killed after its last checkpoint: the run is complete
                lines_before = (len((workdir / "metrics.jsonl").read_text().splitlines())
                                if (workdir / "metrics.jsonl").exists() else 0)
                proc = subprocess.Popen(command(workdir, args.steps), env=env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
                started = time.perf_counter()
                if kills < args.kills:
                    # A third of the kills during start-up, the rest once steps run (a
                    # moment anywhere in the training time the run has left).
                    if rng.random() < 1 / 3:
                        delay = rng.uniform(0.3, startup)
                    else:
                        delay = wait_for_lines(workdir, lines_before, proc) + rng.uniform(
                            0, (duration - startup) * (1 - resume / args.steps))
                    try:
                        proc.wait(timeout=max(0.0, delay - (time.perf_counter() - started)))
                    except subprocess.TimeoutExpired:
                        where = phase(workdir, lines_before)
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        kills, run_kills = kills + 1, run_kills + 1
                        phases[where] = phases.get(where, 0) + 1
                        print(f"run {runs} attempt {attempts}: resumed at step {resume}, "
                              f"SIGKILL after {delay:.2f} s ({where})")
                        continue
                _, err = proc.communicate()
                if proc.returncode != 0:
                    print(f"run {runs} attempt {attempts}: exited {proc.returncode}\n"
                          f"{err[-3000:]}")
                    return 1
                break
            same_losses, same_params = same_as_reference(workdir)
            failures += not (same_losses and same_params)
            print(f"run {runs}: completed (last start at step {resume}) after {run_kills} "
                  f"kill(s): losses of all {len(want_losses)} steps bit-identical: "
                  f"{same_losses}; final parameters bit-identical: {same_params}")
            runs += 1
            if kills >= args.kills:
                break
        print(f"kills: {kills} ({', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}); "
              f"attempts: {attempts}; completed runs: {runs}, differing from the "
              f"uninterrupted run: {failures}")
        return 0 if failures == 0 else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
