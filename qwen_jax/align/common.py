"""What the alignment runs share: the checked construction of model, tokenizer, mesh and
optimizer (train.build's checks plus the `config.align` keys), pair data, frozen models
(DPO's and PPO's reference, PPO's reward model) and the pair-batch step plumbing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.align import data as align_data
from qwen_jax.align import models
from qwen_jax.data.pipeline import DataError
from qwen_jax.io.checkpoint import CheckpointError, load_config, load_run_params, run_kind
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.build import TrainError, build_trainer, shape_of, tokenizer_for
from qwen_jax.train.task import Task, global_arrays, initial_params

TASKS = ("lm", "reward", "dpo", "ppo")
FROZEN_DTYPES = ("float32", "bfloat16")
PAIR_KEYS = ("chosen_tokens", "chosen_segments", "chosen_response", "rejected_tokens",
             "rejected_segments", "rejected_response", "margin", "valid")


def check_align_config(cfg) -> None:
    a = cfg.align
    if cfg.task not in TASKS:
        raise TrainError(f"config.task={cfg.task!r}: expected one of {TASKS}")
    if a.frozen_dtype not in FROZEN_DTYPES:
        raise TrainError(f"config.align.frozen_dtype={a.frozen_dtype!r}: expected one of "
                         f"{FROZEN_DTYPES}")
    if cfg.task == "reward" and cfg.lora.rank:
        raise TrainError(f"config.lora.rank={cfg.lora.rank}: a reward model trains fully "
                         "(LoRA is for the language-model tasks: lm, dpo and ppo's policy)")
    if cfg.task in ("reward", "dpo") and cfg.microbatches != 1:
        raise TrainError(f"config.microbatches={cfg.microbatches}: the {cfg.task} step takes "
                         "its whole batch at once (microbatches=1)")
    for key in ("dpo_beta", "clip_eps", "value_clip", "temperature"):
        if not a[key] > 0:
            raise TrainError(f"config.align.{key}={a[key]}: expected > 0")
    for key in ("kl_coef", "ptx_coef", "value_warmup_steps"):
        if a[key] < 0:
            raise TrainError(f"config.align.{key}={a[key]}: expected >= 0")
    if not 0 < a.top_p <= 1 or not 0 <= a.gamma <= 1 or not 0 <= a.lam <= 1:
        raise TrainError(f"config.align: top_p in (0, 1], gamma and lam in [0, 1] expected, "
                         f"got top_p={a.top_p}, gamma={a.gamma}, lam={a.lam}")
    if a.reward_norm not in ("none", "mean", "mean_std"):
        raise TrainError(f"config.align.reward_norm={a.reward_norm!r}: expected 'none', 'mean' "
                         "or 'mean_std'")


def cast_frozen(params, dtype: str):
    """A frozen copy in `dtype`: new buffers (a train step donates the trained ones), the
    shardings of `params`."""
    def cast(x):  # floating point only: a quantised base stays as it is
        return x.astype(jnp.dtype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x)

    return jax.jit(lambda p: jax.tree.map(cast, p))(params)


def initial_lm_params(cfg, trainer, rng):
    """The policy's start: init_from's parameters, or random ones from `rng`."""
    if cfg.init_from:
        return initial_params(cfg, trainer.model_config, trainer.param_shardings())
    return trainer.random_params(rng)


def frozen_reference(cfg, trainer, policy=None):
    """The frozen reference of DPO and PPO: a copy of the initial policy (`policy`, or, on a
    resumed run, init_from / the seed's random parameters again) in align.frozen_dtype."""
    if policy is None:
        policy = initial_lm_params(cfg, trainer, jax.random.PRNGKey(cfg.seed))
    return cast_frozen(policy, cfg.align.frozen_dtype)


class PairTask(Task):
    """A run on preference pairs (reward model, DPO): data, sharded batches, evaluation of
    pairwise accuracy on held-out pairs."""

    def __init__(self, cfg, mesh=None, load: bool = True):
        """load=False: no tokenizer and no data (what compile-only needs)."""
        check_align_config(cfg)
        self.cfg = cfg
        self.trainer = build_trainer(cfg, mesh)
        self.model_config, self.mesh = self.trainer.model_config, self.trainer.mesh
        self.sharding = shd.batch_sharding(self.mesh, 2)
        self.row_sharding = shd.batch_sharding(self.mesh, 1)
        self.tokens_per_step = 2 * cfg.global_batch_size * cfg.data.seq_len  # both sides
        self._eval_fn = None
        if not load:
            return
        self.tokenizer = tokenizer_for(cfg, self.model_config)
        d = cfg.data
        try:
            train, evals = align_data.load_splits(d.source, self.tokenizer, d.seq_len, cfg.seed,
                                                  d.eval_source, cfg.align.toy_size)
        except DataError as e:
            raise TrainError(f"config.data: {e}") from None
        pad = self.tokenizer.eod_id
        self.train_data = align_data.PairIterator(train, cfg.global_batch_size, d.seq_len, pad,
                                                  cfg.seed)
        self.eval_pairs = evals

    def abstract_state(self):
        return self.trainer.abstract_state()

    def device_batch(self, batch: dict) -> dict:
        out = global_arrays({k: batch[k] for k in PAIR_KEYS if batch[k].ndim == 2},
                            self.sharding)
        out.update(global_arrays({k: batch[k] for k in PAIR_KEYS if batch[k].ndim == 1},
                                 self.row_sharding))
        return out

    def next_batch(self):
        return self.device_batch(next(self.train_data))

    def data_state(self) -> dict:
        return self.train_data.get_state()

    def set_data_state(self, state: dict) -> None:
        self.train_data.set_state(state)

    def evaluate_pairs(self, eval_fn, state) -> dict:
        """Mean loss and accuracy over every held-out pair (`eval_steps` batches at most)."""
        cfg = self.cfg
        it = align_data.PairIterator(self.eval_pairs, cfg.global_batch_size, cfg.data.seq_len,
                                     self.tokenizer.eod_id, cfg.seed, shuffle=False, epochs=1)
        sums = {"loss": 0.0, "accuracy": 0.0}
        count = 0.0
        for i, batch in enumerate(it):
            if cfg.eval_steps > 0 and i >= cfg.eval_steps:
                break
            out = jax.device_get(eval_fn(state, self.device_batch(batch)))
            valid = batch["valid"]
            for k in sums:
                sums[k] += float(np.sum(out[k] * valid))
            count += float(valid.sum())
        return {f"eval_{k}": v / count for k, v in sums.items()}

    def describe(self) -> str:
        return (f"{self.kind}: model {self.model_config.num_params() / 1e6:.1f}M params, mesh "
                f"{dict(self.mesh.shape)}, {jax.process_count()} process(es), "
                f"{len(self.train_data.pairs)} train / {len(self.eval_pairs)} eval pairs, "
                f"tokenizer {self.tokenizer.name}")


def load_reward_model(path: str, config, mesh, what: str = "config.reward_model"):
    """The parameters of a reward run's latest step, checked against `config` (a reward
    model of the policy's shape), in `config.param_dtype`."""
    if not path:
        raise TrainError(f"{what} is empty: give the workdir of a reward run (task=reward)")
    try:
        kind = run_kind(path)
        if kind != "reward":
            raise TrainError(f"{what}={path}: not a reward model run (its checkpoints are "
                             f"{kind!r}; train one with task=reward)")
        stored = load_config(path)
        if shape_of(stored) != shape_of(config):
            raise TrainError(f"{what}={path}: a reward model of another model config: "
                             f"{shape_of(stored)} vs the policy's {shape_of(config)}")
        as_stored = config.replace(param_dtype=stored.param_dtype)
        params = load_run_params(path, models.abstract_scalar_params(
            as_stored, models.scalar_shardings(as_stored, mesh)))
        return cast_frozen(params, config.param_dtype)
    except CheckpointError as e:
        raise TrainError(f"{what}: {e}") from None
