"""The training run behind `train.py`: build everything from an ml_collections config, resume
from the latest complete checkpoint, train, evaluate, checkpoint, report.

Everything a user can get wrong (config keys and values, the mesh, the batch split, the data,
the tokenizer, a checkpoint of another model) is checked before the work directory is
touched, and reported as one `TrainError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import time

import jax
import numpy as np

from qwen_jax.data import pipeline as data_lib
from qwen_jax.data.tokenizer import ByteTokenizer, TokenizerFileError, load_tokenizer
from qwen_jax.io.checkpoint import CheckpointError, load_config, load_params
from qwen_jax.model.config import ConfigError, QwenConfig, preset
from qwen_jax.model.transformer import param_shardings
from qwen_jax.parallel import sharding as shd
from qwen_jax.train import flops
from qwen_jax.train.checkpoint import TrainCheckpointer
from qwen_jax.train.metrics import MetricsWriter
from qwen_jax.train.optim import OptimizerConfig
from qwen_jax.train.steps import Trainer

_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
               "kv_channels", "vocab_size")


class TrainError(ValueError):
    """A run that cannot start as configured; the message says which setting and why."""


@dataclasses.dataclass
class Run:
    cfg: object
    model_config: QwenConfig
    trainer: Trainer
    tokenizer: object
    train_data: object
    eval_data: object | None
    per_process_batch: int


# ------------------------------------------------------------------------------- building
def model_config(cfg) -> QwenConfig:
    overrides = dict(cfg.model_overrides)
    try:
        if cfg.init_from:
            stored = load_config(cfg.init_from)
            wanted = preset(cfg.model) if cfg.model else stored
            if _shape(stored) != _shape(wanted):
                raise TrainError(f"init_from={cfg.init_from}: checkpoint is for another model "
                                 f"config: {_shape(stored)} vs model={cfg.model!r} "
                                 f"{_shape(wanted)}")
            return stored.replace(**overrides)
        return preset(cfg.model, **overrides)
    except (ConfigError, CheckpointError) as e:
        raise TrainError(str(e)) from None
    except TypeError as e:  # an unknown field in model_overrides
        raise TrainError(f"config.model_overrides: {e}") from None


def _shape(config: QwenConfig) -> dict:
    return {k: getattr(config, k) for k in _SHAPE_KEYS}


def tokenizer_for(cfg, config: QwenConfig):
    try:
        if cfg.tokenizer == "bytes":
            tok = ByteTokenizer()
        else:
            tok = load_tokenizer(cfg.tokenizer or cfg.init_from or None)
    except (TokenizerFileError, OSError) as e:
        raise TrainError(f"config.tokenizer: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise TrainError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's "
                         f"vocab_size is {config.vocab_size}; use a matching tokenizer "
                         "(config.tokenizer) or model")
    return tok


def data_iterator(cfg, tokenizer, per_process_batch: int, split: str):
    d = cfg.data
    source = d.source if split == "train" else (d.eval_source or d.source)
    sources = [s for s in str(source).split(",") if s]
    config = data_lib.DataConfig(
        source=sources[0] if sources == ["stdlib"] else sources, kind=d.kind,
        seq_len=d.seq_len, batch_size=per_process_batch, seed=cfg.seed,
        text_field=d.text_field, num_workers=d.num_workers, sft_packing=d.packing,
        num_epochs=None if split == "train" else 1)
    split = "train" if split == "train" or d.eval_source else "validation"
    try:
        return data_lib.make_iterator(config, tokenizer, split=split)
    except data_lib.DataError as e:
        raise TrainError(f"config.data ({split}): {e}") from None


def build_trainer(cfg, mesh=None) -> Trainer:
    """The model config, mesh and Trainer of `cfg`, checked, without data or tokenizer (what a
    compile-only run needs). `mesh` defaults to cfg.mesh over the local devices."""
    config = model_config(cfg)
    if cfg.data.seq_len > config.max_position_embeddings:
        raise TrainError(f"config.data.seq_len={cfg.data.seq_len} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if mesh is None:
        try:
            mesh = shd.make_mesh(tuple(cfg.mesh))
        except shd.ShardingError as e:
            raise TrainError(f"config.mesh: {e}") from None
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    gbs, micro = cfg.global_batch_size, cfg.microbatches
    if micro < 1 or gbs % micro or (gbs // micro) % data_parallel:
        raise TrainError(f"config.global_batch_size={gbs} must split into microbatches={micro}"
                         f" each divisible by the data-parallel size {data_parallel} "
                         f"(data x fsdp of mesh {tuple(mesh.shape.values())})")
    if gbs % jax.process_count():
        raise TrainError(f"config.global_batch_size={gbs} is not divisible by the "
                         f"{jax.process_count()} processes")
    opt = OptimizerConfig(total_steps=cfg.num_train_steps, **dict(cfg.optimizer))
    try:
        opt.validate()
        param_shardings(config, mesh)
    except (ValueError, shd.ShardingError) as e:
        raise TrainError(f"config: {e}") from None
    return Trainer(config, opt, mesh, micro)


def build(cfg) -> Run:
    trainer = build_trainer(cfg)
    config, gbs = trainer.model_config, cfg.global_batch_size
    tokenizer = tokenizer_for(cfg, config)
    per_process = gbs // jax.process_count()
    train = data_iterator(cfg, tokenizer, per_process, "train")
    evals = None
    if cfg.eval_every_steps > 0 and cfg.eval_steps > 0 and (
            cfg.data.eval_source or cfg.data.source == "stdlib"):
        evals = data_iterator(cfg, tokenizer, per_process, "eval")
    return Run(cfg, config, trainer, tokenizer, train, evals, per_process)


# ------------------------------------------------------------------------------- running
def _global_batch(run: Run, batch: dict):
    sharding = run.trainer.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in data_lib.BATCH_KEYS}


def _initial_state(run: Run, rng):
    if run.cfg.init_from:
        params, _ = load_params(run.cfg.init_from, run.model_config,
                                shardings=run.trainer.param_shardings())
        dtype = np.dtype(run.model_config.param_dtype)  # e.g. float32 masters from bf16 weights
        return run.trainer.state_from_params(jax.tree.map(lambda x: x.astype(dtype), params))
    return run.trainer.init_state(rng)


def _evaluate(run: Run, eval_step, params, initial_state) -> float | None:
    run.eval_data.set_state(initial_state)  # the same validation batches every time
    loss_sum = tokens = 0.0
    for _ in range(run.cfg.eval_steps):
        try:
            batch = next(run.eval_data)
        except StopIteration:
            break
        out = jax.device_get(eval_step(params, _global_batch(run, batch)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return loss_sum / tokens if tokens else None


def train(cfg, workdir, *, config_json: str, stop_at_step: int | None = None) -> dict:
    """Run (or resume) training in `workdir`; returns the end-of-run summary. `stop_at_step`
    ends this invocation early (with a checkpoint) without changing the schedule."""
    run = build(cfg)
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.exists():
        existing = TrainCheckpointer(ckpt_dir, cfg.keep_checkpoints)
        step = existing.latest_step()
        if step is not None:
            stored_model = QwenConfig.from_hf(existing.stored_config(step)["model"])
            if _shape(stored_model) != _shape(run.model_config):
                existing.close()
                raise TrainError(f"{ckpt_dir}: checkpoint step {step} is for another model "
                                 f"config: {_shape(stored_model)} vs {_shape(run.model_config)}")
        existing.close()
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    if primary:
        (workdir / "config.json").write_text(config_json + "\n")
        (workdir / "model_config.json").write_text(run.model_config.to_json() + "\n")

    checkpointer = TrainCheckpointer(ckpt_dir, cfg.keep_checkpoints)
    stored = {"config": json.loads(config_json),
              "model": run.model_config.to_hf(include_ours=True)}
    trainer = run.trainer
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), shd.replicated(trainer.mesh))
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state, _ = checkpointer.restore(start, trainer.abstract_state())
        if data_state is not None:
            run.train_data.set_state(data_state)
    else:
        start = 0
        state = _initial_state(run, jax.random.PRNGKey(cfg.seed))
    eval_initial = run.eval_data.get_state() if run.eval_data is not None else None

    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    writer = MetricsWriter(workdir, cfg.num_train_steps, start, enabled=primary)
    device_kind = jax.devices()[0].device_kind
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    flops_per_step = flops.train_flops_per_token(run.model_config, cfg.data.seq_len) \
        * tokens_per_step

    t0 = time.perf_counter()
    batch = _global_batch(run, next(run.train_data))
    step_fn = trainer.jit_train_step().lower(state, batch, rng).compile()
    eval_fn = trainer.jit_eval_step() if run.eval_data is not None else None
    compile_seconds = time.perf_counter() - t0
    writer.message(f"model {run.model_config.num_params() / 1e6:.1f}M params, mesh "
                   f"{dict(trainer.mesh.shape)}, {tokens_per_step} tokens/step, tokenizer "
                   f"{run.tokenizer.name}; compiled in {compile_seconds:.1f}s")

    step, last_saved, train_seconds, history = start, start, 0.0, []
    interval_start, interval_steps = time.perf_counter(), 0
    last_step = min(cfg.num_train_steps, stop_at_step or cfg.num_train_steps)
    while step < last_step and not preempted:
        state, metrics = step_fn(state, batch, rng)
        step += 1
        interval_steps += 1
        if step % cfg.log_every_steps == 0 or step == last_step:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - interval_start
            train_seconds += elapsed
            record = _step_record(metrics, elapsed / interval_steps, tokens_per_step,
                                  flops_per_step, device_kind)
            history.append(record["loss"])
            writer.write(step, record)
            interval_start, interval_steps = time.perf_counter(), 0
        writer.advance()
        if eval_fn is not None and step % cfg.eval_every_steps == 0:
            eval_loss = _evaluate(run, eval_fn, state.params, eval_initial)
            writer.write(step, {"eval_loss": eval_loss})
            interval_start = time.perf_counter()
        if step % cfg.checkpoint_every_steps == 0 or step == last_step:
            checkpointer.save(step, state, run.train_data.get_state(), stored)
            last_saved = step
            interval_start = time.perf_counter()
        if step < last_step:
            batch = _global_batch(run, next(run.train_data))
    if preempted and last_saved != step:
        checkpointer.save(step, state, run.train_data.get_state(), stored)
    checkpointer.close()
    signal.signal(signal.SIGTERM, previous)
    summary = {"final_step": step, "preempted": bool(preempted),
               "first_logged_loss": history[0] if history else None,
               "last_logged_loss": history[-1] if history else None,
               "compile_seconds": round(compile_seconds, 3),
               "checkpoint_seconds": round(checkpointer.save_seconds, 3),
               "train_seconds": round(train_seconds, 3)}
    writer.message("summary: " + json.dumps(summary))
    writer.close()
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _step_record(metrics, step_seconds, tokens_per_step, flops_per_step, device_kind) -> dict:
    per_device = flops_per_step / step_seconds / jax.device_count()
    record = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
              "learning_rate": float(metrics["learning_rate"]),
              "step_seconds": step_seconds, "tokens_per_second": tokens_per_step / step_seconds,
              "tflops_per_device": per_device / 1e12}
    utilisation = flops.mfu(per_device, device_kind)
    if utilisation is not None:
        record["mfu"] = utilisation
    return record


def maybe_initialize_distributed() -> None:
    """jax.distributed on multi-process runs (TPU pod slices, SLURM / multi-node GPU)."""
    markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE")
    if any(os.environ.get(m) for m in markers):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "TPU_WORKER_HOSTNAMES" in os.environ and "," not in hosts:
            return  # a single-host TPU VM
        jax.distributed.initialize()
