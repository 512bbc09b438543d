"""The environment a multi-process CPU run sets up before XLA's CPU client exists
(qwen_jax/train/processes.py): a larger thread pool and longer collective waits, without
overriding what the user set."""

import os

from qwen_jax.train import processes


def _setup(monkeypatch, flags: str, nproc: str | None = None) -> tuple[str, str | None]:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", flags)
    if nproc is None:
        monkeypatch.delenv("NPROC", raising=False)
    else:
        monkeypatch.setenv("NPROC", nproc)
    processes._cpu_collective_threads()
    return os.environ["XLA_FLAGS"], os.environ.get("NPROC")


def test_threads_and_collective_waits(monkeypatch):
    flags, nproc = _setup(monkeypatch, "--xla_force_host_platform_device_count=4")
    assert int(nproc) == max(os.cpu_count() or 1, 4 * processes.THREADS_PER_CPU_DEVICE)
    assert flags.startswith("--xla_force_host_platform_device_count=4 ")
    for flag, seconds in processes.COLLECTIVE_WAIT_SECONDS.items():
        assert f"--{flag}={seconds}" in flags.split()


def test_the_users_settings_win(monkeypatch):
    terminate = "xla_cpu_collective_call_terminate_timeout_seconds"
    flags, nproc = _setup(monkeypatch, f"--{terminate}=7", nproc="3")
    assert nproc == "3"
    assert [f for f in flags.split() if terminate in f] == [f"--{terminate}=7"]
    warn = "xla_cpu_collective_call_warn_stuck_timeout_seconds"
    assert f"--{warn}={processes.COLLECTIVE_WAIT_SECONDS[warn]}" in flags.split()
