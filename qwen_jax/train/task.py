"""What a training run trains: `Task`. The loop (`qwen_jax.train.loop.train`) owns everything
every kind of run shares (resume from the latest complete checkpoint, the work directory,
metrics, evaluation and checkpoint cadence, SIGTERM, `stop_at_step`, the divergence guard,
several processes); a task owns its state, its data and its step. `LMTask` is next-token
training (pretraining and SFT); `qwen_jax.align` adds the reward model, DPO and PPO.

A task's state is a flax struct with at least `step`, `params` (the model a checkpoint of
the run exports: the policy of PPO), `nonfinite_steps` and `last_nonfinite_step` (see
`qwen_jax.train.steps`); its step's metrics carry the two counters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import numpy as np

from qwen_jax.data import pipeline as data_lib
from qwen_jax.io.checkpoint import load_params
from qwen_jax.model import lora
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import init_params, param_shardings
from qwen_jax.parallel import sharding as shd
from qwen_jax.train import flops
from qwen_jax.train.build import Run, TrainError, build


def global_arrays(batch: dict, sharding, keys=None) -> dict:
    """Host arrays that every process holds in full -> global arrays of `sharding`: each
    device takes its rows, so the arrays do not depend on how devices split into processes."""
    return {k: jax.make_array_from_callback(np.shape(batch[k]), sharding,
                                            lambda index, a=np.asarray(batch[k]): a[index])
            for k in (keys or batch)}


@contextlib.contextmanager
def data_errors(what: str):
    """A data problem (also one raised inside grain's readers, which wrap it) becomes one
    TrainError naming the file, line and problem."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (only data errors become messages)
        cause = e
        while cause is not None and not isinstance(cause, data_lib.DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise TrainError(f"config.data ({what}): {cause}") from None


def next_batch(iterator, what: str) -> dict:
    with data_errors(what):
        try:
            return next(iterator)
        except StopIteration:
            raise TrainError(f"config.data: the {what} data ran out") from None


def initial_params(cfg, model_config: QwenConfig, shardings):
    """The parameters of `cfg.init_from` in the model's parameter dtype (e.g. float32 masters
    from bf16 weights), on `shardings`; a LoRA model gets fresh adapters on them (and its
    base quantised if asked: qwen_jax.model.lora.attach)."""
    dtype = np.dtype(model_config.param_dtype)
    if not model_config.lora_rank:
        params, _ = load_params(cfg.init_from, model_config, shardings=shardings)
        return jax.tree.map(lambda x: x.astype(dtype), params)
    plain_config = model_config.replace(lora_rank=0, base_quant="none")
    mesh = jax.tree.leaves(shardings)[0].mesh
    params, _ = load_params(cfg.init_from, plain_config,
                            shardings=param_shardings(plain_config, mesh))
    if model_config.base_quant == "none":  # else quantised from the stored dtype
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    rng = jax.random.PRNGKey(cfg.seed)
    with shd.activation_sharding(mesh):
        return jax.jit(lambda p, r: lora.attach(p, init_params(model_config, r), model_config),
                       out_shardings=shardings)(params, rng)


def has_sub_byte(tree) -> bool:
    """Whether `tree` holds 4-bit arrays (a Q-LoRA model's quantised base)."""
    return any(x.dtype in (jax.numpy.int4, jax.numpy.uint4) for x in jax.tree.leaves(tree))


class Task:
    """The interface the loop runs (see the module doc). Subclasses set `cfg`,
    `model_config`, `tokenizer` and `mesh`."""

    kind = "lm"  # recorded with every checkpoint: what its `params` are
    cfg: Any
    model_config: QwenConfig
    tokenizer: Any
    mesh: Any

    def initial_state(self, rng):
        raise NotImplementedError

    def abstract_state(self):
        raise NotImplementedError

    def next_batch(self):
        raise NotImplementedError

    def data_state(self) -> dict:
        raise NotImplementedError

    def set_data_state(self, state: dict) -> None:
        raise NotImplementedError

    def compile(self, state, batch, rng) -> Callable:
        """The step: `(state, batch, rng) -> (state, metrics)`."""
        raise NotImplementedError

    def evaluate(self, state) -> dict | None:
        return None

    def log_record(self, metrics, step_seconds: float) -> dict:
        return {"step_seconds": step_seconds}

    def describe(self) -> str:
        return f"model {self.model_config.num_params() / 1e6:.1f}M params"


class LMTask(Task):
    """Next-token training (`config.data.kind` pretrain or sft) with `Trainer`'s steps."""

    def __init__(self, run: Run):
        self.run, self.cfg, self.model_config = run, run.cfg, run.model_config
        self.trainer, self.tokenizer, self.mesh = run.trainer, run.tokenizer, run.trainer.mesh
        self.eval_initial = run.eval_data.get_state() if run.eval_data is not None else None
        self.tokens_per_step = self.cfg.global_batch_size * self.cfg.data.seq_len
        self.flops_per_step = flops.train_flops_per_token(
            self.model_config, self.cfg.data.seq_len) * self.tokens_per_step
        self._eval_fn = None

    @classmethod
    def from_config(cls, cfg) -> "LMTask":
        return cls(build(cfg))

    def initial_state(self, rng):
        if self.cfg.init_from:
            return self.trainer.state_from_params(
                initial_params(self.cfg, self.model_config, self.trainer.param_shardings()))
        return self.trainer.init_state(rng)

    def abstract_state(self):
        return self.trainer.abstract_state()

    def next_batch(self):
        batch = next_batch(self.run.train_data, "train")
        return global_arrays(batch, self.trainer.batch_sharding(), data_lib.BATCH_KEYS)

    def data_state(self) -> dict:
        return self.run.train_data.get_state()

    def set_data_state(self, state: dict) -> None:
        with data_errors("train"):
            self.run.train_data.set_state(state)

    def compile(self, state, batch, rng):
        step = self.trainer.jit_train_step()
        if has_sub_byte(state):
            # XLA CPU hands out 4-bit arrays unpacked, while an ahead-of-time compile wants
            # them packed; a jitted call lays its arguments out itself (and compiles once).
            return step
        return step.lower(state, batch, rng).compile()

    def evaluate(self, state) -> dict | None:
        run = self.run
        if run.eval_data is None:
            return None
        if self._eval_fn is None:
            self._eval_fn = self.trainer.jit_eval_step()
        run.eval_data.set_state(self.eval_initial)  # the same validation batches every time
        loss_sum = tokens = 0.0
        for _ in range(self.cfg.eval_steps):
            try:
                batch = next_batch(run.eval_data, "eval")
            except TrainError:
                if run.eval_data.get_state() == self.eval_initial:
                    raise
                break  # a finite validation split ends
            out = jax.device_get(self._eval_fn(
                state.params, global_arrays(batch, self.trainer.batch_sharding(),
                                            data_lib.BATCH_KEYS)))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        return {"eval_loss": loss_sum / tokens if tokens else None}

    def log_record(self, metrics, step_seconds: float) -> dict:
        per_device = self.flops_per_step / step_seconds / jax.device_count()
        record = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                  "learning_rate": float(metrics["learning_rate"]),
                  "step_seconds": step_seconds,
                  "tokens_per_second": self.tokens_per_step / step_seconds,
                  "tflops_per_device": per_device / 1e12}
        utilisation = flops.mfu(per_device, jax.devices()[0].device_kind)
        if utilisation is not None:
            record["mfu"] = utilisation
        return record

    def describe(self) -> str:
        return (f"model {self.model_config.num_params() / 1e6:.1f}M params, mesh "
                f"{dict(self.mesh.shape)}, {jax.process_count()} process(es), "
                f"{self.tokens_per_step} tokens/step, tokenizer {self.tokenizer.name}")
