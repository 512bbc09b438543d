"""The environment a CPU run with several devices (several processes, or one process with
several devices) sets up before XLA's CPU client exists (qwen_jax/train/processes.py): a
larger thread pool and longer collective waits, without overriding what the user set; a
single process with one device is left alone."""

import os

from qwen_jax.train import processes


def _setup(monkeypatch, flags: str, nproc: str | None = None,
           single_process: bool = False) -> tuple[str, str | None]:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", flags)
    if nproc is None:
        monkeypatch.delenv("NPROC", raising=False)
    else:
        monkeypatch.setenv("NPROC", nproc)
    processes._cpu_collective_threads(single_process=single_process)
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


def test_one_process_with_several_devices(monkeypatch):
    """Collectives between one process's own devices hold threads of the same pool."""
    flags, nproc = _setup(monkeypatch, "--xla_force_host_platform_device_count=8",
                          single_process=True)
    assert int(nproc) == max(os.cpu_count() or 1, 8 * processes.THREADS_PER_CPU_DEVICE)


def test_one_process_with_one_device_is_left_alone(monkeypatch):
    flags, nproc = _setup(monkeypatch, "--xla_force_host_platform_device_count=1",
                          single_process=True)
    assert (flags, nproc) == ("--xla_force_host_platform_device_count=1", None)
    monkeypatch.setenv("XLA_FLAGS", "")
    processes._cpu_collective_threads(single_process=True)
    assert os.environ["XLA_FLAGS"] == "" and "NPROC" not in os.environ


def test_single_host_start_up_sizes_the_pool(monkeypatch):
    """train.py's start-up on one host (no coordinator, no cluster variables) applies it."""
    for marker in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                   "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(marker, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.delenv("NPROC", raising=False)
    processes.initialize_distributed()
    assert int(os.environ["NPROC"]) == max(os.cpu_count() or 1,
                                           4 * processes.THREADS_PER_CPU_DEVICE)
