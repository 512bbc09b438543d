"""Several processes, one run: jax.distributed start-up, and decisions made once.

Every process runs the same training command. What touches the file system (start fresh or
resume, which step) is decided by process 0 and shared with `agree`; `barrier` makes the
others wait where they must (a directory process 0 creates).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen_jax.train.build import TrainError


def is_primary() -> bool:
    return jax.process_index() == 0


def agree(value: int) -> int:
    """Process 0's `value` on every process: file-system decisions are made once."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed for multi-process runs: the three values given explicitly (any
    cluster, or several processes on one machine), else detected (TPU pod slices, SLURM,
    Open MPI, JAX_COORDINATOR_ADDRESS); nothing on a single host."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise TrainError("--coordinator_address, --num_processes and --process_id go "
                             "together (e.g. --coordinator_address=10.0.0.1:1234 "
                             "--num_processes=2 --process_id=0)")
        if not 0 <= process_id < num_processes:
            raise TrainError(f"--process_id={process_id} outside [0, --num_processes="
                             f"{num_processes})")
        _cpu_collective_threads()
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE")
    if any(os.environ.get(m) for m in markers):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "TPU_WORKER_HOSTNAMES" in os.environ and "," not in hosts:
            return  # a single-host TPU VM
        _cpu_collective_threads()
        jax.distributed.initialize()
        return
    _cpu_collective_threads(single_process=True)


THREADS_PER_CPU_DEVICE = 4
# XLA CPU's limits on how long a device waits in a cross-process collective: warn after,
# abort the run after (a user's own XLA_FLAGS settings win).
COLLECTIVE_WAIT_SECONDS = {"xla_cpu_collective_call_warn_stuck_timeout_seconds": 120,
                           "xla_cpu_collective_call_terminate_timeout_seconds": 1800}


def _cpu_collective_threads(single_process: bool = False) -> None:
    """Several CPU devices in a run: give XLA's CPU thread pool at least
    THREADS_PER_CPU_DEVICE threads per local device (the `NPROC` variable XLA reads when it
    creates the CPU client; by default the pool has one thread per core).

    XLA runs a CPU program's collectives, the cross-process (gloo) ones and those between a
    process's own devices alike, as blocking waits on that pool, and a device may start
    another collective that does not depend on the first while the first still waits. Devices
    that reach two independent collectives in different orders then each hold a thread in
    one, waiting for partners that need a free thread to reach it: with fewer threads than
    that, the run hangs with idle CPUs. PPO's update (two models, many independent
    collectives) hung in about 1 of 3 two-process launches on a 2-core machine; none of 13
    did with the larger pool. One process with 8 CPU devices hung the same way (device 1
    waiting in an all-gather with device 3, device 3 with the 6 others in a collective
    permute), in 2 of 3 launches, and XLA aborts such a wait between a process's own devices
    after 40 s; 3 of 3 finished with the larger pool. A user's own NPROC is kept, and a
    single process with one device is left alone (it has no collectives). Cross-process
    collectives also get longer waits before XLA warns and aborts (COLLECTIVE_WAIT_SECONDS):
    under load, XLA's default limits aborted a two-process PPO job of the full test suite in
    a collective it had waited on."""
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms.split(",")[0].strip() != "cpu":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    devices = int(found.group(1)) if found else max(1, jax.config.jax_num_cpu_devices)
    if single_process and devices == 1:
        return
    for flag, seconds in COLLECTIVE_WAIT_SECONDS.items():
        if f"--{flag}=" not in flags:
            flags = f"{flags} --{flag}={seconds}".strip()
    os.environ["XLA_FLAGS"] = flags
    if os.environ.get("NPROC"):
        return
    os.environ["NPROC"] = str(max(os.cpu_count() or 1, THREADS_PER_CPU_DEVICE * devices))
