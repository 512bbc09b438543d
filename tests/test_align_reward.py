"""The reward model (qwen_jax/align/reward.py, models.py): its head against transformers'
Qwen2ForSequenceClassification, configs/reward_tiny.py end to end through train.py, exact
resume, bad input, and a reward workdir refused as a language model."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from qwen_jax.align import models
from qwen_jax.data.tokenizer import ByteTokenizer
from qwen_jax.io.qwen2 import qwen2_config, to_qwen2_state_dict
from qwen_jax.model.config import preset

import runs
from runs import cli, one_error_line, records
from scaled_weights import scaled_params

TOK = ByteTokenizer()
# Qwen2 has no dynamic NTK / LogN: ours runs with both off.
CONFIG = preset("tiny", use_dynamic_ntk=False, use_logn_attn=False, dtype="float32",
                param_dtype="float32", matmul_precision="highest", attention_impl="xla")


# ------------------------------------------------------------------------------ helpers
def train(workdir, *overrides, devices=1):
    return runs.train("reward_tiny", workdir, *overrides, devices=devices)


def train_losses(workdir):
    return {r["step"]: r["loss"] for r in records(workdir) if "loss" in r}


# ------------------------------------------------------------------------------ vs transformers


def test_reward_head_matches_transformers_sequence_classification():
    backbone = scaled_params(CONFIG)
    params = models.init_scalar_params(CONFIG, jax.random.PRNGKey(1), backbone=backbone)
    assert "lm_head" not in params and params["score"]["kernel"].shape == (CONFIG.hidden_size, 1)
    # an O(1) head too, so that rewards are O(1)
    params["score"]["kernel"] = np.asarray(
        np.random.default_rng(2).standard_normal((CONFIG.hidden_size, 1))
        / np.sqrt(CONFIG.hidden_size), np.float32)
    # the backbone is the one given (not a fresh init)
    np.testing.assert_array_equal(params["embed"]["embedding"], backbone["embed"]["embedding"])

    pad = TOK.eod_id
    lengths = [24, 17, 9, 2]
    seq_len = 24
    rng = np.random.default_rng(3)
    tokens = np.full((len(lengths), seq_len), pad, np.int32)
    segments = np.zeros((len(lengths), seq_len), np.int32)
    for i, n in enumerate(lengths):
        real = rng.integers(0, CONFIG.vocab_size - 1, n)
        real[real >= pad] += 1  # never the pad id: transformers pools at the last non-pad
        tokens[i, :n] = real
        segments[i, :n] = 1
    assert not np.any((tokens == pad) & (segments == 1))

    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, t, s: models.rewards(p, CONFIG, t, s))(
            params, tokens, segments))
        every = np.asarray(jax.jit(lambda p, t, s: models.values(p, CONFIG, t, s))(
            params, tokens, segments))

    state_dict = to_qwen2_state_dict(params, CONFIG)
    assert "lm_head.weight" not in state_dict
    state_dict["score.weight"] = np.ascontiguousarray(np.asarray(params["score"]["kernel"]).T)
    hf_config = transformers.Qwen2Config(**qwen2_config(CONFIG), num_labels=1,
                                         pad_token_id=pad, attn_implementation="eager")
    model = transformers.Qwen2ForSequenceClassification(hf_config).to(torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False)
    theirs = out.logits.float().numpy()
    assert theirs.shape == (len(lengths), 1)

    assert ours.shape == (len(lengths),) and ours.dtype == np.float32
    assert np.abs(theirs).max() > 0.1  # O(1) rewards: a wrong pooling cannot hide in atol
    np.testing.assert_allclose(ours, theirs[:, 0], atol=1e-4, rtol=0)
    # the test can tell pooling positions apart: the last position of padded rows differs
    assert np.all(np.abs(every[1:, -1] - theirs[1:, 0]) > 1e-3)
    np.testing.assert_allclose(every[np.arange(len(lengths)), np.asarray(lengths) - 1], ours,
                               atol=0, rtol=0)


def test_last_index_left_and_right_padding():
    seg = np.asarray([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(models.last_index(seg)), [2, 4, 0, 4])


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def reward_run(reward_tiny_run):
    return reward_tiny_run


def test_reward_tiny_learns_the_preference(reward_run):
    workdir, result = reward_run
    recs = records(workdir)
    evals = [r for r in recs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]
    last = evals[-1]
    print(f"reward_tiny eval_accuracy: {[r['eval_accuracy'] for r in evals]}")
    assert last["eval_accuracy"] >= 0.9, evals
    assert 0 <= last["eval_loss"] < np.log(2)  # better than chance (loss log 2)
    losses = train_losses(workdir)
    steps = sorted(losses)
    assert steps == list(range(25, 151, 25))
    assert losses[steps[-1]] < 0.5 * losses[steps[0]], losses
    train_recs = [r for r in recs if "loss" in r]
    assert {"loss", "accuracy", "margin", "grad_norm", "learning_rate"} <= set(train_recs[0])
    assert train_recs[-1]["margin"] > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 150 and summary["nonfinite_steps"] == 0
    # a reward model has no lm_head: train.py does not suggest sampling from it
    assert "qwen_jax.generate" not in result.stdout


def test_generate_refuses_a_reward_workdir(reward_run):
    workdir, _ = reward_run
    result = cli("--checkpoint", workdir, "--prompt", "say abc:", "--max-new-tokens", 4,
                 module="qwen_jax.generate")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "reward" in line and "lm_head" in line, line
    assert result.stdout.strip() == ""


def test_reward_checkpoint_loads_as_scalar_params(reward_run):
    from qwen_jax.io.checkpoint import load_config, load_run_params, run_kind

    workdir, _ = reward_run
    assert run_kind(workdir) == "reward"
    config = load_config(workdir)
    params = load_run_params(workdir, models.abstract_scalar_params(config), as_numpy=True)
    assert "lm_head" not in params and params["score"]["kernel"].shape == (config.hidden_size, 1)
    # the trained model scores held-out toy pairs the right way round
    from qwen_jax.align import data as align_data

    pairs = align_data.toy_digits_pairs(64, 12345, TOK)
    batch = align_data.pair_batch(pairs, 32, TOK.eod_id)
    config = config.replace(dtype="float32")
    rc = models.rewards(params, config, batch["chosen_tokens"], batch["chosen_segments"])
    rr = models.rewards(params, config, batch["rejected_tokens"], batch["rejected_segments"])
    assert float(np.mean(np.asarray(rc) > np.asarray(rr))) >= 0.9


# ------------------------------------------------------------------------------ resume
SHORT = ("--config.num_train_steps=8", "--config.log_every_steps=1",
         "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
         "--config.align.toy_size=256", "--config.global_batch_size=8",
         "--config.optimizer.warmup_steps=2")


def test_resume_logs_the_same_losses(tmp_path):
    straight = train(tmp_path / "straight", *SHORT, devices=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train(tmp_path / "resumed", *SHORT, "--stop_at_step=3", devices=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(train_losses(tmp_path / "resumed")) == [1, 2, 3]
    second = train(tmp_path / "resumed", *SHORT, devices=2)
    assert second.returncode == 0, second.stderr[-3000:]
    want, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(want) == list(range(1, 9))
    assert sorted(got) == list(range(1, 9))
    assert len(set(want.values())) > 1  # the steps differ: a constant would match anything
    np.testing.assert_allclose([got[s] for s in range(4, 9)], [want[s] for s in range(4, 9)],
                               rtol=1e-6, atol=0)
    evals = lambda w: {r["step"]: r["eval_accuracy"] for r in records(w)
                       if "eval_accuracy" in r}
    assert evals(tmp_path / "resumed") == evals(tmp_path / "straight")
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["final_step"] == 8


# ------------------------------------------------------------------------------ bad input
def pairs_file(path, bad_row, bad_line=5):
    rows = [{"prompt": f"question {i}:", "chosen": f"answer {i}", "rejected": f"no {i}"}
            for i in range(40)]
    rows[bad_line - 1] = bad_row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad_row, overrides, expected", [
    ({"prompt": "q:", "chosen": "same", "rejected": "same"}, (),
     ["prefs.jsonl:5:", "identical"]),
    ({"prompt": "q:", "chosen": "fine", "rejected": ""}, (),
     ["prefs.jsonl:5:", "empty 'rejected' response"]),
    ({"prompt": "a very long prompt " * 3, "chosen": "yes", "rejected": "no"},
     ("--config.data.seq_len=16",), ["prefs.jsonl", "no room for a response", "seq_len=16"]),
], ids=["identical", "empty-response", "prompt-too-long"])
def test_bad_pairs_fail_with_one_line_and_no_workdir(tmp_path, bad_row, overrides, expected):
    source = pairs_file(tmp_path / "prefs.jsonl", bad_row)
    workdir = tmp_path / "run"
    result = train(workdir, f"--config.data.source={source}", "--config.num_train_steps=2",
                   *overrides)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    for part in expected:
        assert part in line, line
    assert not workdir.exists()
