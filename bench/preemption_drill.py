"""Preemption drill: kill a training run with SIGKILL at random moments (start-up, mid-step,
mid-save), restart it each time, and check that the run that finally completes logged the
same losses as an uninterrupted run, bit for bit, and ends with the same parameters.

    python bench/preemption_drill.py [--kills 10] [--steps 40] [--seed 0]

Each kill is classified by what the workdir showed at that moment: "start-up" (no step
logged yet by this attempt), "mid-save" (an Orbax step directory still under its temporary
name) or "mid-step". Prints one line per attempt and a verdict; exits 1 on any difference.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def command(workdir, steps):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), f"--config.num_train_steps={steps}",
            "--config.data.seq_len=64", "--config.global_batch_size=8",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
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
        subprocess.run(command(reference, args.steps), env=env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        duration = time.perf_counter() - t0
        print(f"uninterrupted run: {args.steps} steps in {duration:.1f} s")

        workdir = scratch / "drilled"
        kills, attempts, phases = 0, 0, {}
        while True:
            attempts += 1
            before = len(logged_losses(workdir))
            lines_before = (len((workdir / "metrics.jsonl").read_text().splitlines())
                            if (workdir / "metrics.jsonl").exists() else 0)
            proc = subprocess.Popen(command(workdir, args.steps), env=env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            if kills < args.kills:
                delay = rng.uniform(0.3, duration)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    where = phase(workdir, lines_before)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    phases[where] = phases.get(where, 0) + 1
                    print(f"attempt {attempts}: SIGKILL after {delay:.2f} s ({where}); steps "
                          f"logged so far {max(logged_losses(workdir), default=0)}")
                    continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(f"attempt {attempts}: exited {proc.returncode}\n{err[-3000:]}")
                return 1
            print(f"attempt {attempts}: completed (from step {before})")
            if kills >= args.kills:
                break
            shutil.rmtree(workdir)  # finished before enough kills: drill again from scratch

        from qwen_jax.io.checkpoint import load_params  # noqa: E402
        import jax  # noqa: E402
        import numpy as np  # noqa: E402

        want, got = logged_losses(reference), logged_losses(workdir)
        same_losses = want == got
        a, _ = load_params(reference, as_numpy=True)
        b, _ = load_params(workdir, as_numpy=True)
        same_params = all(np.array_equal(x, y) for x, y in
                          zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
        print(f"kills: {kills} ({', '.join(f'{k} {v}' for k, v in sorted(phases.items()))}); "
              f"attempts: {attempts}")
        print(f"losses of all {len(want)} steps bit-identical: {same_losses}; final parameters "
              f"bit-identical: {same_params}")
        return 0 if same_losses and same_params else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
