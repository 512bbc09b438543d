"""The slot decoder behind the server's continuous batching: requests that join and leave a
running batch get exactly what `generate` gives each of them alone."""

import numpy as np
import pytest

from qwen_jax.infer import slots as slots_lib
from qwen_jax.infer.generate import generate
from qwen_jax.infer.sampling import GenerationConfig, SamplingParams
from qwen_jax.infer.slots import SlotDecoder, chunk_plan
from qwen_jax.model.config import preset
from scaled_weights import scaled_params

# Dynamic NTK and LogN on (seq_length 64: the longer prompts change the NTK level), windows
# off; O(1)-scale weights so that greedy choices are clear-cut.
CONFIG = preset("tiny", use_dynamic_ntk=True, use_logn_attn=True, seq_length=64)


@pytest.fixture(scope="module")
def params():
    return scaled_params(CONFIG)


def _alone(params, prompt, sp: SamplingParams, n, seed, row, kv_cache):
    """What generate gives choice `row` of a request with this prompt (rows 0..row)."""
    g = GenerationConfig(max_new_tokens=n, do_sample=sp.do_sample, temperature=sp.temperature,
                         top_k=sp.top_k, top_p=sp.top_p,
                         repetition_penalty=sp.repetition_penalty, stop_sequences=(),
                         pad_token_id=0)
    out = generate(params, CONFIG, [prompt] * (row + 1), g, seed=seed, kv_cache=kv_cache)
    return out.tokens[row].tolist()


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_requests_joining_a_running_batch_get_what_they_get_alone(params, kv_cache):
    rng = np.random.default_rng(1)
    greedy, penalty = SamplingParams(), SamplingParams(repetition_penalty=1.2)
    top_p = SamplingParams(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.1)
    top_k = SamplingParams(do_sample=True, top_k=5)
    # (prompt length, sampling, tokens, seed, row): 150 tokens is 3 prefill chunks of 64;
    # request 2 is cut short (released mid-generation) and its slot reused.
    reqs = [(5, greedy, 18, 0, 0), (150, top_p, 12, 7, 0), (33, penalty, 30, 0, 0),
            (70, top_k, 10, 3, 1), (12, top_p, 14, 9, 0), (90, greedy, 8, 0, 0)]
    prompts = [rng.integers(0, 500, n).tolist() for n, *_ in reqs]
    want = [_alone(params, p, sp, n, seed, row, kv_cache)
            for p, (_, sp, n, seed, row) in zip(prompts, reqs)]
    want[2] = want[2][:6]
    # a 512-slot cache: the decode step reads 128 or 256 of them (the rows reach 162)
    dec = SlotDecoder(params, CONFIG, slots=3, max_seq_len=512, prefill_chunk=64,
                      kv_cache=kv_cache)
    got = {i: [] for i in range(len(reqs))}
    owner, waiting, joined_running = {}, list(range(len(reqs))), []
    while waiting or owner:
        while waiting and len(owner) < dec.num_slots:
            slot = min(set(range(dec.num_slots)) - set(owner))
            i = waiting.pop(0)
            _, sp, _, seed, row = reqs[i]
            joined_running.append(any(got[j] for j in owner.values()))
            owner[slot] = i
            dec.admit(slot, prompts[i], sp, seed=seed, row=row)
        for slot, token in dec.step():
            i = owner[slot]
            got[i].append(token)
            if len(got[i]) == len(want[i]):
                dec.release(slot)
                del owner[slot]
    for i in range(len(reqs)):
        assert got[i] == want[i], i
    assert sum(joined_running[3:]) == 3  # the later ones joined rows that were decoding


def test_prefill_chunks_and_compiled_programs(params):
    assert chunk_plan(5, 512) == [(64, 5)]
    assert chunk_plan(100, 512) == [(128, 100)]
    assert chunk_plan(150, 64) == [(64, 64), (64, 64), (64, 22)]
    assert chunk_plan(128, 64) == [(64, 64), (64, 64)]
    dec = SlotDecoder(params, CONFIG, slots=4, max_seq_len=128, prefill_chunk=64)
    for slot, n in enumerate((3, 20, 40, 9)):
        dec.admit(slot, list(range(1, n + 1)), SamplingParams(), seed=0)
    for _ in range(4):  # one prompt per step: 1, 2, 3 (padded to 4), then 4 rows decode
        dec.step()
    compiled = slots_lib._decode._cache_size()
    for _ in range(8):  # the same rows at other lengths (within 128 slots): no new program
        dec.step()
    assert slots_lib._decode._cache_size() == compiled
    # one prompt prefilled per step; from that step on the row decodes every step
    assert [dec.length(s) for s in range(4)] == [3 + 12, 20 + 11, 40 + 10, 9 + 9]
    assert dec.lengths == {s: dec.length(s) for s in range(4)}  # what attend_len follows
    with pytest.raises(ValueError, match="not free"):
        dec.admit(0, [1, 2], SamplingParams(), seed=0)
    with pytest.raises(ValueError, match="a prompt of 128 tokens"):
        dec.release(0)
        dec.admit(0, [1] * 128, SamplingParams(), seed=0)


@pytest.mark.parametrize("kind", [None, "int8"])
def test_per_row_cache_decodes_like_the_shared_index(params, kind):
    """The per-row cache written for every row at once (the compile-only decode row's step)
    gives the logits of generate's shared-index cache."""
    import jax.numpy as jnp

    from qwen_jax.model.kv_cache import init_cache
    from qwen_jax.model.transformer import Qwen

    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 500, (2, 10)), jnp.int32)
    model = Qwen(CONFIG)
    logits, caches = {}, {}
    for per_row in (False, True):
        cache = init_cache(CONFIG, 2, 32, kind, per_row=per_row)
        out, cache = model.apply({"params": params}, tokens, cache=cache)
        steps = [out[:, -1]]
        for _ in range(4):
            token = jnp.argmax(steps[-1], axis=-1).astype(jnp.int32)[:, None]
            out, cache = model.apply({"params": params}, token, cache=cache)
            steps.append(out[:, -1])
        logits[per_row], caches[per_row] = np.stack(steps), cache
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5)
    assert caches[True].index.tolist() == [14, 14] and int(caches[False].index) == 14
