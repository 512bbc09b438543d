"""Which JAX platforms a process starts.

With libtpu installed (the test extra installs it for the compile-only checks) but no TPU chip
on the host, JAX would still start the TPU runtime on first use, and libtpu prints start-up
errors ("unexpected worker hostname ...") before JAX falls back to the CPU. `skip_absent_tpu`
tells JAX to start the CPU alone in exactly that case: libtpu present, no TPU chip, no other
accelerator plugin installed, nothing chosen by the user (JAX_PLATFORMS / jax_platforms), and
no backend started yet. The compile-only checks use libtpu's compiler through topology
descriptions, which this does not touch.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_OTHER_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin",
                  "jax_rocm7_plugin")


def _has_tpu_chip() -> bool:
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private API moved: look for the device files ourselves
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu() -> bool:
    """Restrict JAX to the CPU on a host with libtpu but no TPU (see module doc); returns
    whether it did."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if any(importlib.util.find_spec(name) for name in _OTHER_PLUGINS):
        return False
    import jax
    from jax._src import xla_bridge

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized() or _has_tpu_chip():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def quiet_topology_compiles() -> None:
    """For compile-only runs on a host without a TPU: libtpu's compiler is wanted, its host
    runtime is not. Without these two variables it looks for the host's TPU workers and
    accelerator type and prints errors about both; the compiled programs do not depend on
    them (the target topology is given explicitly)."""
    if _has_tpu_chip():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
