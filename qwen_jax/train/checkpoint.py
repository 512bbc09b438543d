"""Training checkpoints: an Orbax CheckpointManager with async saves of the train state, the
data-iterator state and the run's record (config, model config, tokenizer).

Orbax writes each step under a temporary name and renames it when complete, so a process
killed mid-save leaves the previous checkpoints restorable; `latest_step()` sees only
completed ones. Restoring takes abstract arrays with the *current* mesh's shardings, so a
checkpoint written on one mesh shape restores onto another. The data-iterator state is one
JSON document for the whole run (every process reads the same global stream), so a run
resumes on another number of processes. The layout is `qwen_jax.io.checkpoint`'s: a workdir
or one of its steps loads as a model checkpoint.
"""

from __future__ import annotations

import pathlib
import time

import orbax.checkpoint as ocp

from qwen_jax.io.checkpoint import STEP_CONFIG, STEP_STATE

DATA_STATE = "data_state"


class TrainCheckpointer:
    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.save_seconds = 0.0
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STEP_STATE: ocp.StandardCheckpointHandler(),
                           DATA_STATE: ocp.JsonCheckpointHandler(),
                           STEP_CONFIG: ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, record: dict) -> None:
        """Start saving `step`; returns once the arrays are copied off the device."""
        start = time.perf_counter()
        self.manager.save(step, args=ocp.args.Composite(**{
            STEP_STATE: ocp.args.StandardSave(state),
            DATA_STATE: ocp.args.JsonSave(data_state),
            STEP_CONFIG: ocp.args.JsonSave(record)}), force=True)
        self.save_seconds += time.perf_counter() - start

    def restore(self, step: int, abstract_state):
        """(state, data-iterator state) of `step`, onto the shardings given."""
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STEP_STATE: ocp.args.StandardRestore(abstract_state),
            DATA_STATE: ocp.args.JsonRestore()}))
        return restored[STEP_STATE], restored[DATA_STATE]

    def stored_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(**{
            STEP_CONFIG: ocp.args.JsonRestore()}))[STEP_CONFIG]

    def wait(self) -> None:
        start = time.perf_counter()
        self.manager.wait_until_finished()
        self.save_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
