"""The training run behind `train.py`: resume from the latest complete checkpoint (or start
fresh), train, evaluate, checkpoint, report; on one process or many. What is trained (the
state, data and step) is a `Task` (qwen_jax/train/task.py): next-token training by default,
the reward model, DPO and PPO from qwen_jax.align.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import time

import jax

from qwen_jax.io.checkpoint import (BYTE_TOKENIZER, HF_SOURCE_FILE, RUN_CHECKPOINTS, TOKENIZER_FILE,
                                   copy_side_files, side_files_dir)
from qwen_jax.model.config import QwenConfig
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.build import TrainError, shape_of
from qwen_jax.train.checkpoint import TrainCheckpointer
from qwen_jax.train.metrics import MetricsWriter
from qwen_jax.train.processes import agree, barrier
from qwen_jax.train.task import LMTask, Task

__all__ = ["Task", "TrainError", "train"]


def _prepare_workdir(run: Task, workdir: pathlib.Path, config_json: str) -> None:
    """Process 0 writes the run's files: configs, and the vocabulary and side files of
    `init_from`, so that the workdir loads like any checkpoint."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_json + "\n")
        (workdir / "model_config.json").write_text(run.model_config.to_json() + "\n")
        if run.cfg.init_from:
            copy_side_files(side_files_dir(run.cfg.init_from), workdir)
            source = side_files_dir(run.cfg.init_from) / HF_SOURCE_FILE
            if source.is_file():
                shutil.copyfile(source, workdir / HF_SOURCE_FILE)
        vocab = getattr(run.tokenizer, "vocab_file", None)
        if vocab is not None and pathlib.Path(vocab) != workdir / TOKENIZER_FILE:
            shutil.copyfile(vocab, workdir / TOKENIZER_FILE)
    barrier("workdir")


def _tokenizer_record(tokenizer) -> str:
    return BYTE_TOKENIZER if getattr(tokenizer, "vocab_file", None) is None else TOKENIZER_FILE


class _Guard:
    """The host's side of the divergence check (the step itself keeps a diverged update out
    of the state): reads the counters in the step's metrics when they reach the host anyway."""

    def __init__(self, cfg, ckpt_dir: pathlib.Path):
        self.mode, self.max_skips = cfg.nonfinite, cfg.max_nonfinite_skips
        self.ckpt_dir, self.last_saved = ckpt_dir, None

    def check(self, metrics) -> None:
        count, last = int(metrics["nonfinite_steps"]), int(metrics["last_nonfinite_step"])
        if count == 0 or (self.mode == "skip" and count <= self.max_skips):
            return
        why = ("a non-finite loss or gradient" if self.mode == "stop" else
               f"{count} non-finite steps (max_nonfinite_skips={self.max_skips})")
        good = (f"{self.ckpt_dir / str(self.last_saved)}" if self.last_saved is not None
                else "none (no checkpoint was saved)")
        raise TrainError(f"step {last}: {why}; training stopped (config.nonfinite="
                         f"{self.mode!r}); last good checkpoint: {good}")


def train(cfg, workdir, *, config_json: str, stop_at_step: int | None = None,
          task: Task | None = None) -> dict:
    """Run (or resume) training in `workdir`; returns the end-of-run summary. `stop_at_step`
    ends this invocation early (with a checkpoint) without changing the schedule. `task`
    defaults to next-token training of `cfg` (LMTask).

    Every process runs this with the same arguments. Decisions about the file system are
    process 0's, shared with the others; every process takes part in Orbax's saves and
    restores; only process 0 writes metrics, configs and the summary."""
    run = task if task is not None else LMTask.from_config(cfg)
    workdir = pathlib.Path(workdir).absolute()
    ckpt_dir = workdir / RUN_CHECKPOINTS
    primary = jax.process_index() == 0
    checkpointer = None
    if agree(ckpt_dir.is_dir()):
        checkpointer = TrainCheckpointer(ckpt_dir, cfg.keep_checkpoints)
    start = agree(-1 if checkpointer is None or checkpointer.latest_step() is None
                   else checkpointer.latest_step())
    try:
        if start >= 0:
            record = checkpointer.stored_config(start)
            stored_model = QwenConfig.from_hf(record["model"])
            if shape_of(stored_model) != shape_of(run.model_config):
                raise TrainError(f"{ckpt_dir}: checkpoint step {start} is for another model "
                                 f"config: {shape_of(stored_model)} vs "
                                 f"{shape_of(run.model_config)}")
            stored_kind = record.get("kind", "lm")
            if stored_kind != run.kind:
                raise TrainError(f"{ckpt_dir}: checkpoint step {start} is a {stored_kind!r} "
                                 f"run, this config trains {run.kind!r} (config.task); use "
                                 "another --workdir")
            state, data_state = checkpointer.restore(start, run.abstract_state())
            run.set_data_state(data_state)
        else:
            start = 0
            state = run.initial_state(jax.random.PRNGKey(cfg.seed))
        batch = run.next_batch()
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        raise
    if checkpointer is None:  # a fresh run: nothing is written before its first batch
        _prepare_workdir(run, workdir, config_json)
        checkpointer = TrainCheckpointer(ckpt_dir, cfg.keep_checkpoints)
    elif primary:
        (workdir / "config.json").write_text(config_json + "\n")
    try:
        return _run_steps(run, state, batch, start, workdir, checkpointer, config_json,
                          stop_at_step)
    finally:
        checkpointer.close()  # waits for a save in flight: the last good one stays complete


def _run_steps(run: Task, state, batch, start: int, workdir: pathlib.Path, checkpointer,
               config_json: str, stop_at_step: int | None) -> dict:
    cfg = run.cfg
    primary = jax.process_index() == 0
    stored = {"config": json.loads(config_json),
              "model": run.model_config.to_hf(include_ours=True),
              "tokenizer": _tokenizer_record(run.tokenizer), "kind": run.kind}
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), shd.replicated(run.mesh))
    guard = _Guard(cfg, workdir / RUN_CHECKPOINTS)
    guard.last_saved = start or None

    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    writer = MetricsWriter(workdir, cfg.num_train_steps, start, enabled=primary)

    t0 = time.perf_counter()
    step_fn = run.compile(state, batch, rng)
    compile_seconds = time.perf_counter() - t0
    writer.message(f"{run.describe()}; compiled in {compile_seconds:.1f}s")

    def save(step):
        checkpointer.save(step, state, run.data_state(), stored)
        guard.last_saved = step

    step, last_saved, train_seconds, history = start, start, 0.0, []
    interval_start, interval_steps = time.perf_counter(), 0
    last_step = min(cfg.num_train_steps, stop_at_step or cfg.num_train_steps)
    metrics = None
    try:
        while step < last_step and not preempted:
            state, metrics = step_fn(state, batch, rng)
            step += 1
            interval_steps += 1
            log = step % cfg.log_every_steps == 0 or step == last_step
            checkpoint = step % cfg.checkpoint_every_steps == 0 or step == last_step
            if log or checkpoint:
                metrics = jax.device_get(metrics)
            if log:
                elapsed = time.perf_counter() - interval_start
                train_seconds += elapsed
                record = run.log_record(metrics, elapsed / interval_steps)
                if int(metrics["nonfinite_steps"]):
                    record["nonfinite_steps"] = int(metrics["nonfinite_steps"])
                history.append(record.get("loss"))
                writer.write(step, record)
                interval_start, interval_steps = time.perf_counter(), 0
            if log or checkpoint:
                guard.check(metrics)  # before any save: a diverged state is never saved
            writer.advance()
            if cfg.eval_every_steps > 0 and step % cfg.eval_every_steps == 0:
                evaluation = run.evaluate(state)
                if evaluation is not None:
                    writer.write(step, evaluation)
                interval_start = time.perf_counter()
            if checkpoint:
                save(step)
                last_saved = step
                interval_start = time.perf_counter()
            if step < last_step:
                batch = run.next_batch()
        if preempted and last_saved != step:
            guard.check(jax.device_get(metrics))
            save(step)
    finally:
        signal.signal(signal.SIGTERM, previous)
        writer.close()
    summary = {"final_step": step, "preempted": bool(preempted),
               "first_logged_loss": history[0] if history else None,
               "last_logged_loss": history[-1] if history else None,
               "nonfinite_steps": int(metrics["nonfinite_steps"]) if metrics else 0,
               "compile_seconds": round(compile_seconds, 3),
               "checkpoint_seconds": round(checkpointer.save_seconds, 3),
               "train_seconds": round(train_seconds, 3)}
    if primary:
        print("summary: " + json.dumps(summary, allow_nan=False), flush=True)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
