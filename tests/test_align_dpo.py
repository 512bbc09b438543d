"""DPO (qwen_jax/align/dpo.py): the sequence log-probabilities against a plain computation
from full logits, configs/dpo_tiny.py end to end through train.py, and its workdir used as a
language model (the policy)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.align import data as align_data
from qwen_jax.align import dpo, losses, models
from qwen_jax.data.tokenizer import ByteTokenizer
from qwen_jax.model.config import preset
from qwen_jax.model.transformer import Qwen, init_params

import runs
from scaled_weights import scaled_params

TOK = ByteTokenizer()
CONFIG = preset("tiny", dtype="float32", param_dtype="float32", matmul_precision="highest",
                attention_impl="xla")
SEQ_LEN = 48


@pytest.fixture(scope="module")
def batch():
    records = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "five or so"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
         "chosen": "hello", "rejected": "go"},
        {"prompt": "say abc:", "chosen": "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6",
         "rejected": "abc", "margin": 0.5},  # chosen cut to seq_len
    ]
    pairs = [align_data.parse_pair(r, TOK, f"mem:{i + 1}") for i, r in enumerate(records)]
    pairs = align_data.check_pairs(pairs, SEQ_LEN, "mem")
    out = align_data.pair_batch(pairs, SEQ_LEN, TOK.eod_id)
    assert out["chosen_segments"][2].all()  # one row fills seq_len exactly
    assert not out["rejected_segments"][0].all()  # others are padded
    return out


@jax.jit
def full_logits(params, tokens, segments):
    """The model's [B, T, V] logits, nothing fused or chunked."""
    return Qwen(CONFIG).apply({"params": params}, tokens, segment_ids=segments, train=False)[0]


def plain_sequence_logprobs(params, tokens, segments, response, shift=1):
    """log_softmax of the full [B, T, V] logits, the next token gathered, summed over the
    response tokens, in float64 numpy (`shift` 0: a wrong, unshifted gather)."""
    with jax.default_matmul_precision("highest"):
        logits = full_logits(params, jnp.asarray(tokens), jnp.asarray(segments))
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    logp = logits - logz[..., None]
    out = np.zeros(tokens.shape[0])
    for i in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if response[i, t]:
                out[i] += logp[i, t - shift, tokens[i, t]]
    return out


@pytest.mark.parametrize("chunk_tokens", [4096, 40])  # one chunk; several, with padding
def test_pair_logprobs_match_full_logits(batch, chunk_tokens):
    params = scaled_params(CONFIG)
    with jax.default_matmul_precision("highest"):
        chosen, rejected = jax.jit(lambda p, b: dpo.pair_logprobs(
            p, CONFIG, b, chunk_tokens=chunk_tokens))(params, batch)
        want_c = plain_sequence_logprobs(params, batch["chosen_tokens"],
                                         batch["chosen_segments"], batch["chosen_response"])
        want_r = plain_sequence_logprobs(params, batch["rejected_tokens"],
                                         batch["rejected_segments"], batch["rejected_response"])
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    assert chosen.shape == rejected.shape == (3,) and chosen.dtype == np.float32
    # the check can fail: an unshifted gather gives other sums, by far more than 1e-5
    unshifted = plain_sequence_logprobs(params, batch["chosen_tokens"],
                                        batch["chosen_segments"], batch["chosen_response"],
                                        shift=0)
    assert np.all(np.abs(unshifted - want_c) > 0.1)
    np.testing.assert_allclose(chosen, want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected, want_r, rtol=1e-5, atol=1e-5)
    # the response mask matters: the whole sequence's log-prob is another number
    whole = plain_sequence_logprobs(params, batch["chosen_tokens"], batch["chosen_segments"],
                                    batch["chosen_segments"])
    assert np.all(np.abs(whole - want_c) > 1.0)


def test_dpo_loss_on_the_model(batch):
    """The step's loss: -log sigmoid(beta ((pc - rc) - (pr - rr))) from two models."""
    policy, reference = scaled_params(CONFIG, seed=0), scaled_params(CONFIG, seed=1)
    beta = 0.1
    with jax.default_matmul_precision("highest"):
        logprobs = jax.jit(lambda p, b: dpo.pair_logprobs(p, CONFIG, b))
        pc, pr = logprobs(policy, batch)
        rc, rr = logprobs(reference, batch)
        per, chosen_reward, rejected_reward = losses.dpo_loss(pc, pr, rc, rr, beta)
        want = [plain_sequence_logprobs(p, batch[f"{s}_tokens"], batch[f"{s}_segments"],
                                        batch[f"{s}_response"])
                for p in (policy, reference) for s in ("chosen", "rejected")]
    z = beta * ((want[0] - want[2]) - (want[1] - want[3]))
    np.testing.assert_allclose(np.asarray(per), np.log1p(np.exp(-z)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chosen_reward), beta * (want[0] - want[2]),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected_reward), beta * (want[1] - want[3]),
                               rtol=1e-4, atol=1e-5)
    # a policy equal to its reference: every pair at log 2, implicit rewards 0
    same, c0, r0 = losses.dpo_loss(pc, pr, pc, pr, beta)
    np.testing.assert_allclose(np.asarray(same), np.log(2.0), rtol=1e-6)
    assert not np.any(np.asarray(c0)) and not np.any(np.asarray(r0))


def test_token_logprobs_entropy(batch):
    """with_entropy: the entropy of each next-token distribution, from the same logits."""
    params = scaled_params(CONFIG)
    tokens, segments = batch["chosen_tokens"], batch["chosen_segments"]
    with jax.default_matmul_precision("highest"):
        logp, entropy = jax.jit(lambda p, t, s: models.token_logprobs(
            p, CONFIG, t, s, chunk_tokens=40, with_entropy=True))(params, tokens, segments)
        logits = full_logits(params, tokens, segments)
    logits = np.asarray(logits, np.float64)[:, :-1]
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.sum(np.exp(logq) * logq, -1)
    np.testing.assert_allclose(np.asarray(entropy), want, rtol=1e-4, atol=1e-4)
    gathered = np.take_along_axis(logq, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), gathered, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return runs.shared_train(tmp_path_factory, "dpo_tiny", "dpo_tiny")


def test_dpo_tiny_learns_the_preference(dpo_run):
    workdir, result = dpo_run
    recs = runs.records(workdir)
    evals = [r for r in recs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]
    print(f"dpo_tiny eval_accuracy: {[r['eval_accuracy'] for r in evals]}")
    assert evals[-1]["eval_accuracy"] >= 0.8, evals
    assert evals[-1]["eval_loss"] < np.log(2)  # the start (policy = reference) is log 2
    train_recs = [r for r in recs if "loss" in r]
    assert {"loss", "reward_margin", "accuracy", "chosen_reward", "rejected_reward",
            "grad_norm", "learning_rate"} <= set(train_recs[0])
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert train_recs[-1]["reward_margin"] > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 150 and summary["nonfinite_steps"] == 0
    # a DPO run is a language model: train.py suggests sampling from it
    assert f"python -m qwen_jax.generate --checkpoint {workdir}" in result.stdout


def test_dpo_workdir_loads_as_a_language_model(dpo_run):
    from qwen_jax.io.checkpoint import load_params, run_kind

    workdir, _ = dpo_run
    assert run_kind(workdir) == "lm"
    params, config = load_params(workdir, as_numpy=True)
    assert params["lm_head"]["kernel"].shape == (config.hidden_size, config.vocab_size)
    assert "score" not in params
    assert config.vocab_size == 512 and config.num_hidden_layers == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
    step50, _ = load_params(workdir / "checkpoints" / "50", as_numpy=True)
    assert not np.array_equal(step50["lm_head"]["kernel"], params["lm_head"]["kernel"])
    # the loaded policy against the run's reference (a random start from the seed, 0) gives
    # the logged eval_accuracy on the held-out pairs of the run
    evals = runs.records(workdir)
    logged = [r for r in evals if "eval_accuracy" in r][-1]["eval_accuracy"]
    pairs = align_data.load_pairs("toy:digits", TOK, 32, "eval", 0)
    assert len(pairs) == 256
    batch = align_data.pair_batch(pairs, 32, TOK.eod_id)
    config = config.replace(dtype="float32")
    reference = init_params(config, jax.random.PRNGKey(0))
    with jax.default_matmul_precision("highest"):
        pc, pr = jax.jit(lambda p, b: dpo.pair_logprobs(p, config, b))(params, batch)
        rc, rr = jax.jit(lambda p, b: dpo.pair_logprobs(p, config, b))(reference, batch)
    implicit = (np.asarray(pc) - np.asarray(rc)) - (np.asarray(pr) - np.asarray(rr))
    accuracy = float(np.mean(implicit > 0))
    assert abs(accuracy - logged) <= 2 / 256, (accuracy, logged)
    # and not by chance: the random start scores itself at 0 (no pair preferred)
    assert accuracy >= 0.8
