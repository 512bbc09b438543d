"""Training checkpoints: Orbax CheckpointManager with async saves of the train state, the
data-iterator state (one file per process, grain's handler) and the run config.

Orbax writes each step under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoints restorable; `latest_step()` sees only
completed ones. Restoring takes abstract arrays with the *current* mesh's shardings, so a
checkpoint written on one mesh shape restores onto another.
"""

from __future__ import annotations

import json
import pathlib
import time

import grain
import orbax.checkpoint as ocp


class _Snapshot:
    """The iterator state at save time; the save itself may finish later (async)."""

    def __init__(self, state):
        self._bytes = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._bytes


class _Receiver:
    """Receives the stored iterator state from grain's handler."""

    state = None

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode())

    def start_prefetch(self) -> None:
        pass


class TrainCheckpointer:
    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.save_seconds = 0.0
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, config: dict) -> None:
        """Start saving `step`; returns once the arrays are copied off the device."""
        start = time.perf_counter()
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.save_seconds += time.perf_counter() - start

    def restore(self, step: int, abstract_state):
        """(state, data_state or None, config dict) of `step`, onto the shardings given."""
        receiver = _Receiver()
        items = {"state": ocp.args.StandardRestore(abstract_state),
                 "config": ocp.args.JsonRestore()}
        step_dir = self.directory / str(step)
        if (step_dir / "data").is_dir():
            items["data"] = grain.checkpoint.CheckpointRestore(receiver)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], receiver.state, restored["config"]

    def stored_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        start = time.perf_counter()
        self.manager.wait_until_finished()
        self.save_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
