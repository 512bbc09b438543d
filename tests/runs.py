"""Command lines run as the user runs them (train.py and the qwen_jax modules in a fresh
process on the CPU), and what they leave: metrics.jsonl records and one-line errors."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*args, module=None, devices=1, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable] + (["-m", module] if module else []) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def train(config: str, workdir, *overrides, devices=1):
    """`python train.py --config configs/<config>.py --workdir W [overrides]`."""
    return cli(ROOT / "train.py", "--config", ROOT / "configs" / f"{config}.py", "--workdir",
               workdir, *overrides, devices=devices)


def records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def one_error_line(stderr):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def bench_module(name: str):
    """bench/<name>.py imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
