"""Command lines run as the user runs them (train.py and the qwen_jax modules in a fresh
process on the CPU), and what they leave: metrics.jsonl records and one-line errors; runs made
once per test session and read by the tests of every xdist worker."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env(devices=1) -> dict:
    """The environment of a command run as the user runs it: the CPU, `devices` devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def cli(*args, module=None, devices=1, timeout=600):
    cmd = [sys.executable] + (["-m", module] if module else []) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def shared_by_workers(tmp_path_factory, name: str, make) -> pathlib.Path:
    """A folder filled once per test session by `make(folder)`, by whichever xdist worker asks
    first; another worker that asks waits for it (a file lock), then reads it. Only for what
    the tests read and never change (a trained run, its exports). Without xdist it is a plain
    session folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, above each worker's own
    folder = root / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".complete").touch()
    return folder


def shared_train(tmp_path_factory, name: str, config: str, *overrides):
    """(workdir, completed process) of `train(config, workdir, *overrides)`, trained once per
    test session (`shared_by_workers`); the run must succeed."""
    def make(folder):
        result = train(config, folder / "run", *overrides)
        (folder / "process.json").write_text(json.dumps(
            {"args": result.args, "returncode": result.returncode, "stdout": result.stdout,
             "stderr": result.stderr}))

    folder = shared_by_workers(tmp_path_factory, name, make)
    result = subprocess.CompletedProcess(**json.loads((folder / "process.json").read_text()))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", result
