"""Several processes, one run: jax.distributed start-up, and decisions made once.

Every process runs the same training command. What touches the file system (start fresh or
resume, which step) is decided by process 0 and shared with `agree`; `barrier` makes the
others wait where they must (a directory process 0 creates).
"""

from __future__ import annotations

import os

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
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE")
    if any(os.environ.get(m) for m in markers):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "TPU_WORKER_HOSTNAMES" in os.environ and "," not in hosts:
            return  # a single-host TPU VM
        jax.distributed.initialize()
