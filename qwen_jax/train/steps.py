"""Sharded training and evaluation steps: masked next-token loss, gradient accumulation over
microbatches, AdamW; jit with explicit shardings and donated state.

A batch is a dict of [batch, seq] arrays: `inputs`, `targets`, `loss_mask`, and optionally
`segment_ids` / `positions` (packed documents attend only within themselves).

Divergence is caught inside the compiled step, so the host needs no round trip per step: a
step whose loss or gradient norm is not finite leaves the parameters and optimizer state
as they were and is counted in the state (`nonfinite_steps`,
`last_nonfinite_step`). With `nonfinite="stop"` the first such step also freezes every later
step, so the state stays the last finite one until the host, at its next look at the
metrics, stops the run; with "skip" training goes on and the host stops after
`max_nonfinite_skips`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.model import lora
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import jnp_dtype, precision
from qwen_jax.model.loss import fused_cross_entropy
from qwen_jax.model.transformer import Qwen, init_params, param_shardings
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The next-token loss. `fused`: the lm_head and cross-entropy run chunk by chunk
    (model/loss.py), never materialising the [tokens, vocab] logits; exact against the
    plain loss. z_loss and label_smoothing apply to training, not evaluation."""

    fused: bool = True
    chunk_tokens: int = 4096
    z_loss: float = 0.0
    label_smoothing: float = 0.0

    def validate(self) -> None:
        if self.chunk_tokens < 1 or self.z_loss < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss: chunk_tokens >= 1, z_loss >= 0 and 0 <= label_smoothing "
                             f"< 1 expected, got {self}")
        if not self.fused and (self.z_loss or self.label_smoothing):
            raise ValueError("loss: z_loss and label_smoothing need fused=True")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How a Trainer's parameters are made and laid out: `init(config, rng)` and
    `shardings(config, mesh)`. The default is the language model; qwen_jax.align.models has
    the reward/value model's (the backbone with a scalar head)."""

    init: Callable = init_params
    shardings: Callable = param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # int32: steps whose update was not applied (non-finite)
    last_nonfinite_step: jax.Array  # int32: the newest such step (1-based), 0 if none


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything that turns (config, mesh) into jitted, sharded step functions."""

    model_config: QwenConfig
    optimizer_config: OptimizerConfig
    mesh: Mesh
    microbatches: int = 1
    nonfinite: str = "stop"  # or "skip" (see the module doc)
    loss: LossConfig = LossConfig()
    params: ParamSpec = ParamSpec()
    # LoRA: path (tuple of keys) -> whether that parameter trains (qwen_jax.model.lora
    # .trainable_fn). The rest is frozen: no gradient and no optimizer state. None: all train.
    trainable: Callable[[tuple], bool] | None = None
    # Unroll the microbatch loop (XLA's cost analysis then counts every microbatch: the
    # compile-only report's cost extrapolation; a rolled loop counts its body once).
    unroll_microbatches: bool = False

    @property
    def model(self) -> Qwen:
        return Qwen(self.model_config)

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.optimizer_config)

    # ------------------------------------------------------------------ trained / frozen
    def split(self, params):
        """(the parameters that train, the frozen rest); (params, {}) without LoRA."""
        if self.trainable is None:
            return params, {}
        return lora.split(params, self.trainable)

    def combine(self, trained, frozen):
        return trained if self.trainable is None else lora.combine(trained, frozen)

    def value_and_grad(self, fn, has_aux: bool = False):
        """`jax.value_and_grad` of `fn(params, *args)` with respect to the parameters that
        train: the gradient tree holds those only (no gradient for a LoRA model's base)."""
        def wrapped(params, *args):
            trained, frozen = self.split(params)
            return jax.value_and_grad(lambda t, *a: fn(self.combine(t, frozen), *a),
                                      has_aux=has_aux)(trained, *args)
        return wrapped

    def checked_update(self, grads, opt_state, params, optimizer=None):
        """`checked_update` of the parameters that train; returns the whole tree."""
        trained, frozen = self.split(params)
        new, opt_state, norm, finite = checked_update(optimizer or self.optimizer, grads,
                                                      opt_state, trained)
        return self.combine(new, frozen), opt_state, norm, finite

    def guarded_update(self, state, grads, loss):
        """`guarded_update` of the parameters that train; returns the whole state."""
        trained, frozen = self.split(state.params)
        new, grad_norm = guarded_update(state.replace(params=trained), grads, loss,
                                        self.optimizer, self.nonfinite)
        return new.replace(params=self.combine(new.params, frozen)), grad_norm

    # ------------------------------------------------------------------ shardings
    def param_shardings(self):
        return self.params.shardings(self.model_config, self.mesh)

    def state_shardings(self) -> TrainState:
        params = self.param_shardings()
        abstract_params = jax.eval_shape(lambda: self.params.init(self.model_config,
                                                                  jax.random.PRNGKey(0)))
        abstract_opt = jax.eval_shape(self.optimizer.init, self.split(abstract_params)[0])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        flat_params = dict(zip(_paths(abstract_params), jax.tree_util.tree_leaves(params)))

        # Optimizer moments are laid out like the parameters they track.
        def like_param(path, leaf):
            for key in _path_suffixes(path):
                if key in flat_params and flat_params[key] is not None:
                    return flat_params[key]
            return replicated

        opt = jax.tree_util.tree_map_with_path(
            lambda path, leaf: like_param(path, leaf) if leaf.ndim else replicated, abstract_opt)
        return TrainState(step=replicated, params=params, opt_state=opt,
                          nonfinite_steps=replicated, last_nonfinite_step=replicated)

    def batch_sharding(self) -> NamedSharding:
        return shd.batch_sharding(self.mesh, 2)

    def abstract_state(self) -> TrainState:
        shardings = self.state_shardings()
        shapes = jax.eval_shape(lambda: self._init(jax.random.PRNGKey(0)))
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    # ------------------------------------------------------------------ state
    def _fresh(self, params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params,
                          opt_state=self.optimizer.init(self.split(params)[0]),
                          nonfinite_steps=zero, last_nonfinite_step=zero)

    def _init(self, rng) -> TrainState:
        return self._fresh(self.params.init(self.model_config, rng))

    def random_params(self, rng):
        """The parameters `init_state` starts from, without the optimizer state."""
        with shd.activation_sharding(self.mesh):
            return jax.jit(lambda r: self.params.init(self.model_config, r),
                           out_shardings=self.param_shardings())(rng)

    def init_state(self, rng) -> TrainState:
        with shd.activation_sharding(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings())(rng)

    def state_from_params(self, params) -> TrainState:
        """A fresh optimizer around given (e.g. imported) parameters."""
        shardings = self.state_shardings()
        with shd.activation_sharding(self.mesh):
            return jax.jit(self._fresh, in_shardings=(shardings.params,),
                           out_shardings=shardings)(params)

    # ------------------------------------------------------------------ loss
    def loss_sums(self, params, batch, rng, train: bool):
        """(sum of masked token losses, number of loss tokens) for one microbatch."""
        head = None
        if self.loss.fused:
            cfg, loss = self.model_config, self.loss

            def head(hidden, _to_logits):
                return fused_cross_entropy(
                    hidden, params["lm_head"]["kernel"], batch["targets"],
                    dtype=jnp_dtype(cfg.dtype), chunk_tokens=loss.chunk_tokens,
                    z_loss=loss.z_loss if train else 0.0,
                    label_smoothing=loss.label_smoothing if train else 0.0,
                    precision=precision(cfg))

        out, _ = self.model.apply(
            {"params": params}, batch["inputs"], positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"), train=train,
            rngs={"dropout": rng} if train else None, head=head)
        if head is None:  # out: the logits
            logz = jax.nn.logsumexp(out, axis=-1)
            target = jnp.take_along_axis(out, batch["targets"][..., None], axis=-1)[..., 0]
            out = logz - target
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(out * mask), jnp.sum(mask)

    def _split_microbatches(self, batch):
        """[B, T] -> [k, B/k, T]; microbatch i takes rows i, i+k, ... so every device's slice
        of the batch holds an equal share of each microbatch (no resharding)."""
        k = self.microbatches

        def split(x):
            b = x.shape[0]
            return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

        return {key: split(value) for key, value in batch.items()}

    def _train_step(self, state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        trained, frozen = self.split(state.params)
        # The loss is the masked token mean over the whole batch; its token count is known
        # before the forward pass, so each microbatch's gradient comes out already divided
        # by it (the division rides on the loss's cotangent instead of a pass over the
        # gradients).
        count = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def scaled(p, mb, r):
            loss, n = self.loss_sums(self.combine(p, frozen), mb, r, True)
            return loss / count, n

        grad_fn = jax.value_and_grad(scaled, has_aux=True)
        if self.microbatches == 1:  # no accumulator to zero and add into
            (loss, _), grads = grad_fn(trained, batch, jax.random.fold_in(rng, 0))
        else:
            micro = self._split_microbatches(batch)

            def accumulate(carry, xs):
                grads, loss = carry
                mb, i = xs
                mb = {key: jax.lax.with_sharding_constraint(v, self.batch_sharding())
                      for key, v in mb.items()}
                (part, _), g = grad_fn(trained, mb, jax.random.fold_in(rng, i))
                return (jax.tree_util.tree_map(jnp.add, grads, g), loss + part), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trained)
            (grads, loss), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros(())), (micro, jnp.arange(self.microbatches)),
                unroll=self.unroll_microbatches)
        new_state, grad_norm = self.guarded_update(state, grads, loss)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": learning_rate_schedule(self.optimizer_config)(state.step),
                   "tokens": count, "nonfinite_steps": new_state.nonfinite_steps,
                   "last_nonfinite_step": new_state.last_nonfinite_step}
        return new_state, metrics

    def _eval_step(self, params, batch):
        loss_sum, count = self.loss_sums(params, batch, None, False)
        return {"loss_sum": loss_sum, "tokens": count}

    # ------------------------------------------------------------------ jitted
    def jit_train_step(self) -> Callable:
        state = self.state_shardings()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        fn = jax.jit(self._train_step, in_shardings=(state, self.batch_sharding(), replicated),
                     out_shardings=(state, replicated), donate_argnums=(0,))
        return under_mesh(fn, self.mesh)

    def jit_eval_step(self) -> Callable:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        fn = jax.jit(self._eval_step, in_shardings=(self.param_shardings(),
                                                    self.batch_sharding()),
                     out_shardings=replicated)
        return under_mesh(fn, self.mesh)


def checked_update(optimizer, grads, opt_state, params):
    """One optimizer update: (new params, new optimizer state, gradient norm, finite), where
    `finite` says the gradient norm (float32, whatever the gradients' dtype) is finite.

    That also vouches for the update: from finite gradients and a finite state, AdamW with
    eps > 0 and b1, b2 < 1 (what OptimizerConfig accepts) gives a finite update, since its
    denominator is at least eps and a gradient whose square overflows makes the norm
    infinite first. So the update's norm is not taken: that reduction needed every update
    written out before the parameters could be, a whole extra pass over the parameters and
    both moments (an AdamW update of 363M bf16 parameters on 2 CPU cores went from 2.9-3.5 s
    to 1.65-2.2 s without it, in 3 runs of 5 updates each way)."""
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree_util.tree_leaves(grads)))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grad_norm, jnp.isfinite(grad_norm)


def keep_if(apply, new, old):
    """`new` where `apply` (a scalar bool) holds, else `old`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)


def guarded_update(state, grads, loss, optimizer, nonfinite: str):
    """`state` (with step, params, opt_state and the non-finite counters) after one optimizer
    update from `grads`, unless the loss, gradient or update is not finite (then unchanged
    but counted; see the module doc). Returns (state, gradient norm)."""
    params, opt_state, grad_norm, finite = checked_update(optimizer, grads, state.opt_state,
                                                          state.params)
    finite = finite & jnp.isfinite(loss)
    halted = (nonfinite == "stop") & (state.nonfinite_steps > 0)
    apply = finite & ~halted
    bad = ~finite & ~halted
    step = state.step + 1
    return state.replace(
        step=step, params=keep_if(apply, params, state.params),
        opt_state=keep_if(apply, opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + bad.astype(jnp.int32),
        last_nonfinite_step=jnp.where(bad, step, state.last_nonfinite_step)), grad_norm


def under_mesh(fn, mesh):
    def wrapped(*args):
        with shd.activation_sharding(mesh):
            return fn(*args)
    wrapped.lower = lambda *args: _lower_under_mesh(fn, mesh, *args)
    return wrapped


def _lower_under_mesh(fn, mesh, *args):
    with shd.activation_sharding(mesh):
        return fn.lower(*args)


def _paths(tree):
    return [_path_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _path_key(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _path_suffixes(path):
    """Candidate parameter paths inside an optimizer-state path (mu/nu mirror the params)."""
    key = _path_key(path)
    return [key[i:] for i in range(len(key))]
