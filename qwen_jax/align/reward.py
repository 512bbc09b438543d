"""Reward model training (report §3.2.1): a Qwen backbone with a scalar head read at each
sequence's end token, trained on preference pairs with the pairwise (Bradley-Terry) loss
-log sigmoid(r_chosen - r_rejected - margin). Both stages of the report, preference-model
pretraining on large comparison data and finetuning on annotated pairs, are this task on
different data (configs/reward_7b.py; a second run takes the first as init_from).

Metrics: loss, accuracy (r_chosen > r_rejected), margin (mean r_chosen - r_rejected);
eval_loss and eval_accuracy on held-out pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from qwen_jax.align import losses, models
from qwen_jax.align.common import PairTask, initial_lm_params, load_reward_model
from qwen_jax.io.checkpoint import CheckpointError, run_kind
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.build import TrainError
from qwen_jax.train.optim import learning_rate_schedule
from qwen_jax.train.steps import guarded_update, under_mesh


def pair_rewards(params, config, batch, *, train=False, rng=None):
    """(r_chosen, r_rejected) [B] from one forward pass over both sides."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    segments = jnp.concatenate([batch["chosen_segments"], batch["rejected_segments"]])
    r = models.rewards(params, config, tokens, segments, train=train, rng=rng)
    b = batch["chosen_tokens"].shape[0]
    return r[:b], r[b:]


class RewardTask(PairTask):
    kind = "reward"

    def __init__(self, cfg, mesh=None, load: bool = True):
        super().__init__(cfg, mesh, load)
        self.lm_trainer = self.trainer  # reads a language model given as init_from
        self.trainer = dataclasses.replace(self.trainer, params=models.SCALAR_PARAMS)

    # ------------------------------------------------------------------ state
    def initial_state(self, rng):
        """From init_from: a language model (the head is new) or a reward run (PMP, then
        finetuning: its head is kept); else random."""
        cfg = self.cfg
        if not cfg.init_from:
            return self.trainer.init_state(rng)
        try:
            from_reward = run_kind(cfg.init_from) == "reward"
        except CheckpointError as e:
            raise TrainError(f"config.init_from: {e}") from None
        if from_reward:
            backbone = load_reward_model(cfg.init_from, self.model_config, self.mesh,
                                         "config.init_from")
        else:
            backbone = initial_lm_params(cfg, self.lm_trainer, rng)
        with shd.activation_sharding(self.mesh):
            params = jax.jit(lambda r, b: models.init_scalar_params(self.model_config, r, b),
                             out_shardings=self.trainer.param_shardings())(rng, backbone)
        return self.trainer.state_from_params(params)

    # ------------------------------------------------------------------ steps
    def _stats(self, rc, rr, batch):
        per = losses.pairwise_loss(rc, rr, batch["margin"])
        w = batch["valid"]
        n = jnp.maximum(jnp.sum(w), 1.0)
        return {"loss": jnp.sum(per * w) / n,
                "accuracy": jnp.sum((rc > rr) * w) / n,
                "margin": jnp.sum((rc - rr) * w) / n}, per

    def train_step(self, state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            rc, rr = pair_rewards(params, self.model_config, batch, train=True, rng=rng)
            stats, _ = self._stats(rc, rr, batch)
            return stats["loss"], stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, grad_norm = guarded_update(state, grads, loss, self.trainer.optimizer,
                                              self.cfg.nonfinite)
        return new_state, {**stats, "grad_norm": grad_norm,
                           "learning_rate": learning_rate_schedule(
                               self.trainer.optimizer_config)(state.step),
                           "nonfinite_steps": new_state.nonfinite_steps,
                           "last_nonfinite_step": new_state.last_nonfinite_step}

    def eval_step(self, state, batch):
        rc, rr = pair_rewards(state.params, self.model_config, batch)
        _, per = self._stats(rc, rr, batch)
        return {"loss": per, "accuracy": (rc > rr).astype(jnp.float32)}

    def jit_train_step(self):
        rep = shd.replicated(self.mesh)
        shardings = self.trainer.state_shardings()
        fn = jax.jit(self.train_step, in_shardings=(shardings, None, rep),
                     out_shardings=(shardings, rep), donate_argnums=(0,))
        return under_mesh(fn, self.mesh)

    def compile(self, state, batch, rng):
        return self.jit_train_step().lower(state, batch, rng).compile()

    def evaluate(self, state):
        if self._eval_fn is None:
            self._eval_fn = under_mesh(jax.jit(self.eval_step), self.mesh)
        return self.evaluate_pairs(self._eval_fn, state)

    def log_record(self, metrics, step_seconds: float) -> dict:
        keys = ("loss", "accuracy", "margin", "grad_norm", "learning_rate")
        return {**{k: float(metrics[k]) for k in keys}, "step_seconds": step_seconds,
                "tokens_per_second": self.tokens_per_step / step_seconds}

