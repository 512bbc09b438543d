"""PPO as the report runs it (§3.2.2): four models on one mesh: the policy (init_from, an SFT
model), a frozen reference (its copy), the value model (initialised from the reward model)
and the frozen reward model (`config.align.reward_model`, a task=reward run). Frozen models
hold no optimizer state and may be bfloat16 (`align.frozen_dtype`).

One step:
  1. rollouts: `samples_per_prompt` responses per prompt from the policy with the KV-cache
     sampler (top-p 0.9), `global_batch_size` sequences of prompt (left padded to
     seq_len - max_new_tokens) + response (right padded);
  2. experience (no gradient): the policy's and reference's token log-probabilities, the
     values, the reward model's score at the response's end token (an `<|endoftext|>` is
     appended to a response cut by max_new_tokens); per-token reward -kl_coef * KL plus the
     score, normalised by running statistics kept across steps, at the last response token;
     GAE (gamma, lam); advantages whitened over the batch;
  3. `ppo_epochs` x `ppo_minibatches` updates: the clipped policy objective (+ ptx_coef x the
     next-token loss on a pretraining batch: PPO-ptx) with the policy's AdamW, and the clipped
     value loss with the value model's; the first `value_warmup_steps` steps update the value
     model only.
`config.microbatches` splits the experience pass and each minibatch's gradients into row
groups (gradient accumulation, exact: each group is weighted by its share of the tokens).
Everything but the rollout is one compiled function. The state (both trained models, both
optimizers, the running reward statistics) is checkpointed; the sampling seed is derived
from the seed and the step, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.align import data as align_data
from qwen_jax.align import losses, models
from qwen_jax.align.common import (cast_frozen, check_align_config, frozen_reference,
                                   initial_lm_params, load_reward_model)
from qwen_jax.data import pipeline as data_lib
from qwen_jax.data.pipeline import DataError
from qwen_jax.infer.generate import GenerationConfig, generate
from qwen_jax.parallel import sharding as shd
from qwen_jax.train.build import TrainError, build_trainer, data_iterator, tokenizer_for
from qwen_jax.train.optim import OptimizerConfig
from qwen_jax.train.steps import checked_update, keep_if, under_mesh
from qwen_jax.train.task import Task, global_arrays, next_batch

ROLLOUT_KEYS = ("tokens", "segments", "response", "reward_tokens", "reward_segments")
STAT_KEYS = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl",
             "ptx_loss", "grad_norm", "value_grad_norm")


@flax.struct.dataclass
class PPOState:
    step: jax.Array
    params: Any  # the policy (what a checkpoint of the run exports)
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    moments: Any  # running reward statistics {count, mean, var}
    nonfinite_steps: jax.Array
    last_nonfinite_step: jax.Array


class PPOTask(Task):
    kind = "ppo"

    def __init__(self, cfg, mesh=None, load: bool = True):
        """load=False: no tokenizer, data or reward model (what compile-only needs)."""
        check_align_config(cfg)
        a, d = cfg.align, cfg.data
        self.cfg = cfg
        self.trainer = build_trainer(cfg, mesh)
        self.model_config, self.mesh = self.trainer.model_config, self.trainer.mesh
        gbs, k = cfg.global_batch_size, a.samples_per_prompt
        if k < 1 or gbs % k:
            raise TrainError(f"config.global_batch_size={gbs} must be a multiple of "
                             f"config.align.samples_per_prompt={k}")
        if not 0 < a.max_new_tokens < d.seq_len - 1:
            raise TrainError(f"config.align.max_new_tokens={a.max_new_tokens}: expected 1 to "
                             f"data.seq_len - 2 = {d.seq_len - 2} (seq_len holds prompt and "
                             "response)")
        parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        mb, micro = a.ppo_minibatches, cfg.microbatches
        if micro < 1:
            raise TrainError(f"config.microbatches={micro}: expected >= 1")
        if a.ppo_epochs < 1 or mb < 1 or gbs % mb or (gbs // mb) % (parallel * micro):
            raise TrainError(f"config.align: ppo_epochs >= 1 and global_batch_size={gbs} split "
                             f"into ppo_minibatches={mb}, each divisible by the data-parallel "
                             f"size {parallel} x microbatches={micro}, expected")
        if a.ptx_coef > 0 and (not a.ptx_source or a.ptx_batch_size < 1 or
                               a.ptx_batch_size % (parallel * micro)):
            raise TrainError("config.align.ptx_coef > 0 needs ptx_source and a ptx_batch_size "
                             f"divisible by the data-parallel size {parallel} x "
                             f"microbatches={micro}")
        self.prompt_len = d.seq_len - a.max_new_tokens
        opt = dict(cfg.optimizer, peak_learning_rate=a.value_learning_rate)
        # The value and reward models are full models (a LoRA run adapts the policy only).
        self.scalar_config = self.model_config.replace(lora_rank=0, base_quant="none")
        self.value_trainer = dataclasses.replace(
            self.trainer, params=models.SCALAR_PARAMS, model_config=self.scalar_config,
            trainable=None,
            optimizer_config=OptimizerConfig(total_steps=cfg.num_train_steps, **opt))
        self.sharding = shd.batch_sharding(self.mesh, 2)
        self.reference = self.reward = self._reward_weights = None
        self.tokens_per_step = gbs * d.seq_len
        self.ptx = None
        if not load:
            return
        self.tokenizer = tokenizer_for(cfg, self.model_config)
        try:
            prompts = align_data.load_prompts(d.source, self.tokenizer, self.prompt_len + 1,
                                              cfg.seed, a.toy_size)
        except DataError as e:
            raise TrainError(f"config.data: {e} (data.seq_len - align.max_new_tokens = "
                             f"{self.prompt_len} prompt tokens at most)") from None
        self.prompts = align_data.PromptIterator(prompts, gbs // k, cfg.seed)
        if a.ptx_coef > 0:
            self.ptx = data_iterator(cfg, self.tokenizer, a.ptx_batch_size, "train",
                                     source=a.ptx_source, kind="pretrain",
                                     what="config.align.ptx_source")
        # Kept until the state exists: a fresh run's value model starts from these weights.
        self._reward_weights = load_reward_model(a.reward_model, self.scalar_config, self.mesh)
        self.reward = cast_frozen(self._reward_weights, a.frozen_dtype)

    # ------------------------------------------------------------------ state
    def state_shardings(self) -> PPOState:
        policy, value = self.trainer.state_shardings(), self.value_trainer.state_shardings()
        rep = shd.replicated(self.mesh)
        return PPOState(step=rep, params=policy.params, opt_state=policy.opt_state,
                        value_params=value.params, value_opt_state=value.opt_state,
                        moments={k: rep for k in ("count", "mean", "var")},
                        nonfinite_steps=rep, last_nonfinite_step=rep)

    def _fresh(self, policy, value) -> PPOState:
        zero = jnp.zeros((), jnp.int32)
        return PPOState(step=zero, params=policy,
                        opt_state=self.trainer.optimizer.init(self.trainer.split(policy)[0]),
                        value_params=value,
                        value_opt_state=self.value_trainer.optimizer.init(value),
                        moments=losses.moments_init(), nonfinite_steps=zero,
                        last_nonfinite_step=zero)

    def initial_state(self, rng):
        policy = initial_lm_params(self.cfg, self.trainer, rng)
        self.reference = frozen_reference(self.cfg, self.trainer, policy)
        with shd.activation_sharding(self.mesh):
            return jax.jit(self._fresh, out_shardings=self.state_shardings())(
                policy, self._reward_weights)

    def abstract_state(self) -> PPOState:
        policy, value = self.trainer.abstract_state(), self.value_trainer.abstract_state()
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(self.mesh))
        return PPOState(step=policy.step, params=policy.params, opt_state=policy.opt_state,
                        value_params=value.params, value_opt_state=value.opt_state,
                        moments={k: scalar for k in ("count", "mean", "var")},
                        nonfinite_steps=policy.nonfinite_steps,
                        last_nonfinite_step=policy.last_nonfinite_step)

    # ------------------------------------------------------------------ data
    def next_batch(self):
        batch = {"prompts": next(self.prompts)}
        if self.ptx is not None:
            ptx = next_batch(self.ptx, "ptx")
            batch["ptx"] = global_arrays(ptx, self.sharding, data_lib.BATCH_KEYS)
        return batch

    def data_state(self) -> dict:
        state = {"prompts": self.prompts.get_state()}
        if self.ptx is not None:
            state["ptx"] = self.ptx.get_state()
        return state

    def set_data_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])

    # ------------------------------------------------------------------ rollouts
    def generation_config(self) -> GenerationConfig:
        a, tok = self.cfg.align, self.tokenizer
        return GenerationConfig(
            max_new_tokens=a.max_new_tokens, do_sample=True, temperature=a.temperature,
            top_k=a.top_k, top_p=a.top_p,
            stop_sequences=((tok.eod_id,), (tok.im_end_id,)), pad_token_id=tok.eod_id,
            vocab_limit=tok.vocab_size)

    def rollout(self, params, prompts: list[list[int]], step: int) -> dict:
        """Sample; lay out prompt (left padded) + response (right padded) as host arrays."""
        a = self.cfg.align
        prompts = [p for p in prompts for _ in range(a.samples_per_prompt)]
        seed = int(np.random.SeedSequence([self.cfg.seed, step]).generate_state(1)[0] >> 1)
        with shd.activation_sharding(self.mesh):
            out = generate(params, self.model_config, prompts, self.generation_config(),
                           seed=seed, max_length=self.cfg.data.seq_len,
                           pad_to_multiple=self.prompt_len)
        return layout(prompts, out.tokens, out.num_tokens, out.stop_len, self.prompt_len,
                      self.cfg.data.seq_len, self.tokenizer.eod_id)

    # ------------------------------------------------------------------ the update
    def _split(self, tree):
        """[B, ...] -> [k, B/k, ...] (k = config.microbatches): microbatch i takes rows i,
        i+k, ... so that each device's rows hold an equal share of every microbatch."""
        k = self.cfg.microbatches
        return jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), tree)

    @staticmethod
    def _merge(tree):
        """The inverse of `_split`."""
        return jax.tree.map(
            lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)

    def _constrain(self, tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, shd.batch_sharding(self.mesh, x.ndim)), tree)

    def experience(self, params, value_params, reference, reward, roll):
        """The no-gradient pass over the rollouts: per-token log-probabilities of the policy
        (with entropies) and reference, the values, and the reward-model scores, computed
        `config.microbatches` row groups at a time (the activations of one group live at
        once)."""
        cfg, chunk = self.model_config, self.cfg.loss.chunk_tokens

        def one(r):
            r = self._constrain(r)
            tokens, segments = r["tokens"], r["segments"]
            logp, entropy = models.token_logprobs(params, cfg, tokens, segments,
                                                  chunk_tokens=chunk, with_entropy=True)
            ref = models.token_logprobs(reference, cfg, tokens, segments, chunk_tokens=chunk)
            v = models.values(value_params, self.scalar_config, tokens, segments)[:, :-1]
            score = models.rewards(reward, self.scalar_config, r["reward_tokens"],
                                   r["reward_segments"])
            return logp, entropy, ref, v, score

        if self.cfg.microbatches == 1:
            return one(roll)
        return self._merge(jax.lax.map(one, self._split(roll)))

    def update(self, state: PPOState, reference, reward, roll, ptx, rng):
        """Experience and the PPO updates from one batch of rollouts (module doc, 2-3)."""
        a = self.cfg.align
        rng = jax.random.fold_in(rng, state.step)
        tokens, segments = roll["tokens"], roll["segments"]
        m = roll["response"][:, 1:].astype(jnp.float32)
        old_logp, entropy, ref_logp, old_values, score = self.experience(
            state.params, state.value_params, reference, reward, roll)
        moments = losses.moments_update(state.moments, score)
        norm = score if a.reward_norm == "none" else losses.normalize_rewards(
            score, moments, a.reward_norm == "mean_std")
        kl = losses.kl_penalty(old_logp, ref_logp, a.kl_kind) * m
        last = models.last_index(m)
        rewards = -a.kl_coef * kl
        rewards = rewards.at[jnp.arange(m.shape[0]), last].add(norm)
        adv, returns = losses.gae(rewards, old_values, m, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = losses.masked_whiten(adv, m)
        exp = {"tokens": tokens, "segments": segments, "m": m, "old_logp": old_logp,
               "old_values": old_values, "adv": adv, "returns": returns}

        policy_on = state.step >= a.value_warmup_steps
        halted = (self.cfg.nonfinite == "stop") & (state.nonfinite_steps > 0)
        b, mb, n = tokens.shape[0], a.ppo_minibatches, a.ppo_epochs * a.ppo_minibatches
        # Update j = epoch * mb + i reads rows i of its epoch's shuffle cut in mb. The n
        # updates are one scanned body, not n copies of two models' forward, backward and
        # optimizer: the program compiles in about 1/n of the time.
        rows = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, 1000 + epoch), b)
                          for epoch in range(a.ppo_epochs)]).reshape(n, b // mb)

        def one_update(carry, j):
            s, totals, bad = carry
            sub = exp if mb == 1 else jax.tree.map(lambda x: x[rows[j]], exp)
            key = jax.random.fold_in(rng, j)
            s, stats, ok = self._minibatch(s, sub, ptx, key, policy_on & ~halted, ~halted)
            return (s, {k: totals[k] + stats[k] for k in totals}, bad | ~ok), None

        zeros = {k: jnp.zeros(()) for k in STAT_KEYS}
        (s, totals, bad), _ = jax.lax.scan(one_update, (state, zeros, jnp.zeros((), bool)),
                                           jnp.arange(n))
        count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
        bad = bad & ~halted
        step = state.step + 1
        new = s.replace(step=step, moments=jax.tree.map(
            lambda new, old: jnp.where(halted, old, new), moments, state.moments),
            nonfinite_steps=state.nonfinite_steps + bad.astype(jnp.int32),
            last_nonfinite_step=jnp.where(bad, step, state.last_nonfinite_step))
        metrics = {k: v / n for k, v in totals.items()}
        metrics.update(
            loss=metrics["policy_loss"] + metrics["value_loss"],
            reward_mean=jnp.mean(score), reward_std=jnp.std(score),
            kl=jnp.mean(jnp.sum(kl, axis=1)), entropy=losses.masked_mean(entropy, m),
            response_length=jnp.mean(jnp.sum(m, axis=1)),
            mean_token_kl=jnp.mean(jnp.sum(kl, axis=1) / count),
            policy_updated=policy_on.astype(jnp.float32),
            nonfinite_steps=new.nonfinite_steps, last_nonfinite_step=new.last_nonfinite_step)
        return new, metrics

    def _minibatch(self, s: PPOState, sub, ptx, key, policy_on, value_on):
        """One policy and one value update from a minibatch of experience, its gradients
        accumulated over `config.microbatches` row groups. Each group's token means are
        weighted by its share of the minibatch's response tokens (and the ptx loss by its
        share of the ptx batch's loss tokens), so the sums are the whole minibatch's means."""
        a, cfg = self.cfg.align, self.model_config
        chunk, k = self.cfg.loss.chunk_tokens, self.cfg.microbatches
        total = jnp.maximum(jnp.sum(sub["m"]), 1.0)
        ptx_total = None if ptx is None else jnp.maximum(
            jnp.sum(ptx["loss_mask"].astype(jnp.float32)), 1.0)

        def policy_objective(params, mb, ptx_mb, rng):
            w = jnp.sum(mb["m"]) / total
            logp = models.token_logprobs(params, cfg, mb["tokens"], mb["segments"],
                                         train=True, rng=rng, chunk_tokens=chunk)
            loss, clip, approx_kl = losses.policy_loss(logp, mb["old_logp"], mb["adv"],
                                                       mb["m"], a.clip_eps)
            loss, stats = loss * w, {"clip_fraction": clip * w, "approx_kl": approx_kl * w}
            stats["ptx_loss"] = jnp.zeros(())
            if ptx_mb is not None:
                loss_sum, _ = self.trainer.loss_sums(params, ptx_mb, rng, True)
                stats["ptx_loss"] = loss_sum / ptx_total
                loss = loss + a.ptx_coef * stats["ptx_loss"]
            return loss, stats

        def value_objective(params, mb, rng):
            w = jnp.sum(mb["m"]) / total
            v = models.values(params, self.scalar_config, mb["tokens"], mb["segments"],
                              train=True, rng=rng)[:, :-1]
            loss, clip = losses.value_loss(v, mb["old_values"], mb["returns"], mb["m"],
                                           a.value_clip)
            return loss * w, clip * w

        p_grad = self.trainer.value_and_grad(policy_objective, has_aux=True)
        v_grad = jax.value_and_grad(value_objective, has_aux=True)

        def accumulate(carry, xs):
            mb, ptx_mb, i = xs
            mb, ptx_mb = self._constrain(mb), self._constrain(ptx_mb)
            k_policy, k_value = jax.random.split(jax.random.fold_in(key, i) if k > 1 else key)
            (p_loss, p_stats), pg = p_grad(s.params, mb, ptx_mb, k_policy)
            (v_loss, v_clip), vg = v_grad(s.value_params, mb, k_value)
            step = dict(p_stats, policy_loss=p_loss, value_loss=v_loss,
                        value_clip_fraction=v_clip)
            return jax.tree.map(jnp.add, carry, (pg, vg, step)), None

        stat_zeros = {name: jnp.zeros(()) for name in
                      ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction",
                       "approx_kl", "ptx_loss")}
        zeros = (jax.tree.map(jnp.zeros_like, self.trainer.split(s.params)[0]),
                 jax.tree.map(jnp.zeros_like, s.value_params), stat_zeros)
        if k == 1:
            (p_grads, v_grads, stats), _ = accumulate(zeros, (sub, ptx, 0))
        else:
            (p_grads, v_grads, stats), _ = jax.lax.scan(
                accumulate, zeros, (self._split(sub), None if ptx is None else
                                    self._split(ptx), jnp.arange(k)))
        p_params, p_opt, p_norm, p_ok = self.trainer.checked_update(p_grads, s.opt_state,
                                                                    s.params)
        v_params, v_opt, v_norm, v_ok = checked_update(self.value_trainer.optimizer, v_grads,
                                                       s.value_opt_state, s.value_params)
        ok = (p_ok & v_ok & jnp.isfinite(stats["policy_loss"]) &
              jnp.isfinite(stats["value_loss"]))
        p_on, v_on = policy_on & ok, value_on & ok
        s = s.replace(params=keep_if(p_on, p_params, s.params),
                      opt_state=keep_if(p_on, p_opt, s.opt_state),
                      value_params=keep_if(v_on, v_params, s.value_params),
                      value_opt_state=keep_if(v_on, v_opt, s.value_opt_state))
        return s, dict(stats, grad_norm=p_norm, value_grad_norm=v_norm), ok

    def jit_update(self):
        shardings = self.state_shardings()
        rep = shd.replicated(self.mesh)
        fn = jax.jit(self.update, in_shardings=(shardings, None, None, None, None, rep),
                     out_shardings=(shardings, rep), donate_argnums=(0,))
        return under_mesh(fn, self.mesh)

    # ------------------------------------------------------------------ the loop's step
    def abstract_rollout(self) -> dict:
        """Shape structs of a batch of rollouts (see `layout`), batch-sharded."""
        b, t = self.cfg.global_batch_size, self.cfg.data.seq_len
        return {k: jax.ShapeDtypeStruct((b, t + 1) if k.startswith("reward") else (b, t),
                                        jnp.int32, sharding=self.sharding)
                for k in ROLLOUT_KEYS}

    def compile(self, state, batch, rng):
        if self.reference is None:  # a resumed run: rebuilt from init_from or the seed
            self.reference = frozen_reference(self.cfg, self.trainer)
        self._reward_weights = None  # the value model lives in the state from here on
        update = self.jit_update().lower(state, self.reference, self.reward,
                                         self.abstract_rollout(), batch.get("ptx"),
                                         rng).compile()

        def step(state, batch, rng):
            roll = global_arrays(self.rollout(state.params, batch["prompts"], int(state.step)),
                                 self.sharding, ROLLOUT_KEYS)
            return update(state, self.reference, self.reward, roll, batch.get("ptx"), rng)

        return step

    def log_record(self, metrics, step_seconds: float) -> dict:
        keys = ("loss", "reward_mean", "reward_std", "kl", "entropy", "policy_loss",
                "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl",
                "response_length", "grad_norm", "value_grad_norm", "policy_updated")
        record = {k: float(metrics[k]) for k in keys}
        if self.ptx is not None:
            record["ptx_loss"] = float(metrics["ptx_loss"])
        record["step_seconds"] = step_seconds
        return record

    def describe(self) -> str:
        return (f"ppo: policy and value {self.model_config.num_params() / 1e6:.1f}M params "
                f"each, mesh {dict(self.mesh.shape)}, {jax.process_count()} process(es), "
                f"{self.cfg.global_batch_size} rollouts/step of <= {self.prompt_len} prompt + "
                f"{self.cfg.align.max_new_tokens} response tokens, reward model "
                f"{self.cfg.align.reward_model}")


def layout(prompts, tokens, num_tokens, stop_len, prompt_len: int, seq_len: int,
           eod: int) -> dict:
    """Host arrays of a batch of rollouts: `tokens` / `segments` / `response` [B, seq_len]
    (prompt right-aligned in the first prompt_len slots, the response after it), and the
    reward model's input [B, seq_len + 1]: the same, with an end token appended where the
    response did not stop by itself."""
    b = len(prompts)
    out = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "segments", "response")}
    out["tokens"][:] = eod
    r_tokens = np.full((b, seq_len + 1), eod, np.int32)
    r_segments = np.zeros((b, seq_len + 1), np.int32)
    for i, p in enumerate(prompts):
        n = int(num_tokens[i])
        start = prompt_len - len(p)
        out["tokens"][i, start:prompt_len] = p
        out["tokens"][i, prompt_len:prompt_len + n] = tokens[i, :n]
        out["segments"][i, start:prompt_len + n] = 1
        out["response"][i, prompt_len:prompt_len + n] = 1
        r_tokens[i, :seq_len] = out["tokens"][i]
        r_segments[i, :seq_len] = out["segments"][i]
        if stop_len[i] == 0:  # cut by max_new_tokens: the reward is read at an added end
            r_tokens[i, prompt_len + n] = eod
            r_segments[i, prompt_len + n] = 1
    out["reward_tokens"], out["reward_segments"] = r_tokens, r_segments
    return out


def decode_responses(tokenizer, roll: dict) -> list[str]:
    return [tokenizer.decode(t[r > 0].tolist(), skip_special_tokens=True)
            for t, r in zip(roll["tokens"], roll["response"])]

