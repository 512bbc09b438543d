"""Direct preference optimisation: the policy (from init_from, or random) against a frozen
copy of itself, on preference pairs, with the loss
-log sigmoid(beta ((log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r)))), sequence
log-probabilities summed over the response tokens (beta = config.align.dpo_beta, 0.1). The
reference's log-probabilities are computed in the same compiled step, without gradient,
from its frozen parameters (config.align.frozen_dtype: float32 or bfloat16).

Metrics: loss, reward_margin (mean beta-scaled implicit reward of chosen minus rejected),
accuracy, chosen_reward, rejected_reward; eval_loss and eval_accuracy (how often the
implicit reward prefers the chosen response) on held-out pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.align import losses, models
from qwen_jax.align.common import PairTask, frozen_reference, initial_lm_params
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.optim import learning_rate_schedule
from qwen_jax.train.steps import under_mesh


def pair_logprobs(params, config, batch, *, train=False, rng=None, chunk_tokens=4096):
    """(chosen, rejected) summed response log-probabilities [B], one forward over both."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    segments = jnp.concatenate([batch["chosen_segments"], batch["rejected_segments"]])
    response = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]])
    logp = models.sequence_logprobs(params, config, tokens, segments, response, train=train,
                                    rng=rng, chunk_tokens=chunk_tokens)
    b = batch["chosen_tokens"].shape[0]
    return logp[:b], logp[b:]


class DPOTask(PairTask):
    kind = "dpo"

    def __init__(self, cfg, mesh=None, load: bool = True):
        super().__init__(cfg, mesh, load)
        self.reference = None  # built with the initial state, or again on resume

    def initial_state(self, rng):
        params = initial_lm_params(self.cfg, self.trainer, rng)
        self.reference = frozen_reference(self.cfg, self.trainer, params)
        return self.trainer.state_from_params(params)

    def _stats(self, params, ref, batch, train, rng):
        cfg = self.model_config
        chunk = self.cfg.loss.chunk_tokens
        pc, pr = pair_logprobs(params, cfg, batch, train=train, rng=rng, chunk_tokens=chunk)
        rc, rr = pair_logprobs(ref, cfg, batch, chunk_tokens=chunk)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        per, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr, self.cfg.align.dpo_beta)
        return per, chosen, rejected

    def train_step(self, state, batch, rng, ref):
        rng = jax.random.fold_in(rng, state.step)
        w = batch["valid"]
        n = jnp.maximum(jnp.sum(w), 1.0)

        def loss_fn(params):
            per, chosen, rejected = self._stats(params, ref, batch, True, rng)
            return jnp.sum(per * w) / n, (chosen, rejected)

        (loss, (chosen, rejected)), grads = self.trainer.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        new_state, grad_norm = self.trainer.guarded_update(state, grads, loss)
        mean = lambda x: jnp.sum(x * w) / n  # noqa: E731
        return new_state, {
            "loss": loss, "reward_margin": mean(chosen - rejected),
            "accuracy": mean((chosen > rejected).astype(jnp.float32)),
            "chosen_reward": mean(chosen), "rejected_reward": mean(rejected),
            "grad_norm": grad_norm,
            "learning_rate": learning_rate_schedule(self.trainer.optimizer_config)(state.step),
            "nonfinite_steps": new_state.nonfinite_steps,
            "last_nonfinite_step": new_state.last_nonfinite_step}

    def eval_step(self, state, batch, ref):
        per, chosen, rejected = self._stats(state.params, ref, batch, False, None)
        return {"loss": per, "accuracy": (chosen > rejected).astype(jnp.float32)}

    def jit_train_step(self):
        shardings = self.trainer.state_shardings()
        rep = shd.replicated(self.mesh)
        return under_mesh(jax.jit(self.train_step, in_shardings=(shardings, None, rep, None),
                                  out_shardings=(shardings, rep), donate_argnums=(0,)),
                          self.mesh)

    def compile(self, state, batch, rng):
        if self.reference is None:
            self.reference = frozen_reference(self.cfg, self.trainer)
        compiled = self.jit_train_step().lower(state, batch, rng, self.reference).compile()
        return lambda state, batch, rng: compiled(state, batch, rng, self.reference)

    def evaluate(self, state):
        if self._eval_fn is None:
            fn = under_mesh(jax.jit(self.eval_step), self.mesh)
            self._eval_fn = lambda state, batch: fn(state, batch, self.reference)
        return self.evaluate_pairs(self._eval_fn, state)

    def log_record(self, metrics, step_seconds: float) -> dict:
        keys = ("loss", "reward_margin", "accuracy", "chosen_reward", "rejected_reward",
                "grad_norm", "learning_rate")
        return {**{k: float(metrics[k]) for k in keys}, "step_seconds": step_seconds,
                "tokens_per_second": self.tokens_per_step / step_seconds}
