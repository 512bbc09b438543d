"""Continuous batching on a slot KV cache: the decoder behind the server's engine.

A fixed number of slots (rows) share one per-row KV cache (`init_cache(per_row=True)`): each
row writes at its own index, so rows hold unrelated requests at different lengths. A request
is admitted into a free slot and prefilled there in chunks (one chunk per `step`, so running
rows keep decoding while a long prompt is read); its last chunk samples its first token, and
from then on one compiled decode step advances every live row by one token, whatever mix of
requests the rows hold. A row that is released is simply overwritten by the next request
(admission empties its cache row).

Each row has its own sampling parameters (`sampling.RowSampling`), PRNG key, step count and
row number, and they enter the same processors in the same order as `generate`'s, with the
same key folding (key of the seed, then the step, then the row), so a request gets from a slot
what `generate` gives it alone: greedy ids identical (the math is the same; only the chunking
of the prompt and the padding differ), and with a seed the same samples. The dynamic-NTK level
of a row is set from its whole prompt before the first chunk, as a one-call prefill would fix
it. With the int8 cache a prompt is prefilled as one chunk, as the release quantises it.

    dec = SlotDecoder(params, config, slots=8, max_seq_len=2048)
    dec.admit(slot, prompt_ids, SamplingParams(...), seed=0, row=0)
    while ...:
        for slot, token in dec.step(): ...   # tokens emitted by this step
    dec.release(slot)

Shapes are fixed (the slot count and the cache length); prefill chunks are padded to a power
of two >= 64 up to `prefill_chunk`, and the decode step's attention reads only the cache slots
the longest live row has reached (a power of two >= 128: decoding is bound by reading the
cache, and short requests in a long context would otherwise read all of it), so a handful of
programs serve every request. Which processors the decode step runs (repetition penalty,
sampling, top-k, top-p) is static and follows the live rows, so an all-greedy batch does not
sort the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.infer import sampling
from qwen_jax.infer.sampling import RowFlags, RowSampling, SamplingParams
from qwen_jax.model import long_context
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import KVCache, cache_dtype, init_cache, is_int8
from qwen_jax.model.transformer import Qwen


@flax.struct.dataclass
class SlotState:
    cache: KVCache  # per-row
    token: jax.Array  # [B] int32: each row's next input
    live: jax.Array  # [B] bool: decoding (prefilled, not released)
    seen: jax.Array  # [B, V] bool: tokens of the row's sequence (repetition penalty)
    rows: RowSampling  # [B] each
    key: jax.Array  # [B, 2] uint32: the row's request seed
    row_id: jax.Array  # [B] int32: the row number folded into its keys (the choice index)
    step: jax.Array  # [B] int32: tokens the row has emitted


@dataclasses.dataclass(frozen=True)
class _Static:
    config: QwenConfig
    flags: RowFlags
    vocab_limit: int


def _select(logits, st: SlotState, s: _Static):
    return sampling.select_tokens_rows(logits, st.seen, st.rows, s.flags, s.vocab_limit, st.key,
                                       st.step, st.row_id)


def _rows_of(tree, slot):
    """The slot's row of every array in `tree` (kept as a batch of 1)."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, 0), tree)


def _put_rows(tree, part, slot):
    return jax.tree.map(lambda x, p: jax.lax.dynamic_update_slice_in_dim(x, p, slot, 0), tree,
                        part)


@functools.partial(jax.jit, static_argnames=("s",), donate_argnames=("st",))
def _prefill(params, st: SlotState, slot, tokens, n_real, start, last, prompt_len, rows,
             key, row_id, *, s: _Static):
    """One chunk `tokens` [1, C] (its first `n_real` real) of the prompt of `slot`; `start`:
    the first chunk (the row is emptied and its parameters set); `last`: the prompt's end
    (its first token is chosen and the row goes live). Returns (state, that token)."""
    cfg = s.config
    cache, rest = st.cache, st.replace(cache=None)
    row = _rows_of(rest, slot)
    level = (long_context.dynamic_ntk_level(prompt_len, cfg.seq_length).astype(jnp.int32)
             if cfg.use_dynamic_ntk else jnp.int32(-1))

    def reset(x, value):  # the slot's row of a cache field, emptied by the first chunk
        return x.at[slot].set(jnp.where(start, value, x[slot]))

    cache = cache.replace(segment_ids=reset(cache.segment_ids, 0), index=reset(cache.index, 0),
                          next_position=reset(cache.next_position, 0),
                          ntk_level=reset(cache.ntk_level, level))
    row = row.replace(seen=row.seen & ~start, rows=rows, key=key[None], row_id=row_id[None],
                      step=jnp.zeros_like(row.step))
    segments = (jnp.arange(tokens.shape[1]) < n_real)[None].astype(jnp.int32)

    def head(hidden, to_logits):  # the last real position only
        return to_logits(jax.lax.dynamic_slice_in_dim(hidden, n_real - 1, 1, axis=1))

    logits, cache = Qwen(cfg).apply({"params": params}, tokens, segment_ids=segments,
                                    cache=cache, head=head, cache_rows=slot[None])
    row = row.replace(seen=sampling.mark_seen(row.seen, tokens, segments > 0))
    token = _select(logits[:, -1], row, s)
    row = row.replace(token=jnp.where(last, token, row.token), live=jnp.full((1,), last),
                      step=jnp.where(last, 1, 0) + jnp.zeros_like(row.step),
                      seen=jnp.where(last, sampling.mark_seen(row.seen, token), row.seen))
    return _put_rows(rest, row, slot).replace(cache=cache), token[0]


@functools.partial(jax.jit, static_argnames=("s", "attend_len"), donate_argnames=("st",))
def _decode(params, st: SlotState, rows, *, s: _Static, attend_len: int):
    """One token for each of the slots `rows` [R] (distinct; the live ones, padded with free
    ones, which compute and keep nothing); the other slots are not touched. Attention reads
    the first `attend_len` cache slots (every live row's keys are there). Returns the state
    and the R tokens."""
    sub = jax.tree.map(lambda x: x[rows], st.replace(cache=None))
    segments = sub.live.astype(jnp.int32)[:, None]
    logits, cache = Qwen(s.config).apply({"params": params}, sub.token[:, None],
                                         segment_ids=segments, cache=st.cache,
                                         attend_len=attend_len, cache_rows=rows)
    token = jnp.where(sub.live, _select(logits[:, -1], sub, s), sub.token)
    sub = sub.replace(token=token, step=sub.step + sub.live,
                      seen=sampling.mark_seen(sub.seen, token, sub.live))
    rest = jax.tree.map(lambda x, y: x.at[rows].set(y), st.replace(cache=None), sub)
    return rest.replace(cache=cache), token


def _bucket(n: int, low: int, high: int) -> int:
    """n rounded up to a power of two, within [low, high]: the shapes programs compile for."""
    return min(high, max(low, 1 << (n - 1).bit_length()))


def chunk_plan(length: int, chunk: int, minimum: int = 64) -> list[tuple[int, int]]:
    """(chunk length, real tokens) of each prefill chunk of a `length`-token prompt: full
    chunks of `chunk`, the rest padded to a power of two >= `minimum` (at most `chunk`)."""
    plan = []
    while length > chunk:
        plan.append((chunk, chunk))
        length -= chunk
    plan.append((_bucket(length, minimum, chunk), length))
    return plan


@dataclasses.dataclass
class _Pending:
    slot: int
    prompt: np.ndarray
    params: SamplingParams
    seed: int
    row: int
    plan: list
    done: int = 0  # prompt tokens prefilled


class SlotDecoder:
    """`slots` rows of one per-row KV cache of `max_seq_len` slots (module doc)."""

    def __init__(self, params, config: QwenConfig, *, slots: int, max_seq_len: int,
                 vocab_limit: int = 0, kv_cache=None, prefill_chunk: int = 512):
        if slots < 1 or max_seq_len < 2:
            raise ValueError(f"slots={slots}, max_seq_len={max_seq_len}: expected >= 1, >= 2")
        self.params, self.config, self.num_slots = params, config, slots
        self.max_seq_len, self.vocab_limit = max_seq_len, vocab_limit
        self.kv_cache = cache_dtype(kv_cache)
        # the int8 cache quantises each appended chunk: the prompt goes in whole, as alone
        self.prefill_chunk = max_seq_len if is_int8(self.kv_cache) else max(64, prefill_chunk)
        self.params_of: dict[int, SamplingParams] = {}  # live slots
        self.lengths: dict[int, int] = {}  # tokens in each live slot's cache row
        self.pending: list[_Pending] = []  # admitted, prefill not finished (oldest first)
        self.state: SlotState | None = None
        self.reset()

    def reset(self) -> None:
        """Every slot free, the cache empty (also after a failed step)."""
        b, cfg = self.num_slots, self.config
        self.params_of.clear()
        self.lengths.clear()
        self.pending.clear()
        self.state = None  # let a donated or failed state go before allocating anew
        def zeros():  # a buffer each: the state is donated
            return jnp.zeros((b,), jnp.int32)

        self.state = SlotState(
            cache=init_cache(cfg, b, self.max_seq_len, self.kv_cache, per_row=True),
            token=zeros(), live=jnp.zeros((b,), bool),
            seen=jnp.zeros((b, cfg.vocab_size), bool), rows=RowSampling.of(SamplingParams(), b),
            key=jnp.zeros((b, 2), jnp.uint32), row_id=zeros(), step=zeros())

    @property
    def busy(self) -> set[int]:
        return set(self.params_of) | {p.slot for p in self.pending}

    def admit(self, slot: int, prompt, params: SamplingParams, *, seed: int, row: int = 0):
        """Queue `prompt` for prefill into the free `slot`; its first token comes from the
        `step` that prefills its last chunk. `row`: the row number its keys fold in (a
        request's choice index, as in a `generate` batch of its choices)."""
        prompt = np.asarray(prompt, np.int32)
        if slot in self.busy or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not free")
        if not 0 < len(prompt) < self.max_seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens: expected 1..."
                             f"{self.max_seq_len - 1} (the cache has {self.max_seq_len} slots)")
        self.pending.append(_Pending(slot, prompt, params, int(seed) & 0x7FFFFFFF, int(row),
                                     chunk_plan(len(prompt), self.prefill_chunk)))

    def release(self, slot: int) -> None:
        """Free `slot` (its row stops decoding at the next step)."""
        self.pending = [p for p in self.pending if p.slot != slot]
        self.lengths.pop(slot, None)
        if self.params_of.pop(slot, None) is not None:
            self.state = self.state.replace(live=self.state.live.at[slot].set(False))

    def length(self, slot: int) -> int:
        """Tokens in the slot's cache row (prompt and generated)."""
        return int(self.state.cache.index[slot])

    def step(self) -> list[tuple[int, int]]:
        """One prefill chunk of the oldest admitted prompt (if any), then one decode step of
        every live row (a row whose prompt just ended included); the (slot, token) pairs
        emitted, in order."""
        out = []
        if self.pending:
            out += self._prefill_chunk(self.pending[0])
        live = sorted(self.params_of)
        if live:
            flags = RowFlags.of([self.params_of[s] for s in live])
            # the live slots, padded with free ones to a power of two: a step costs what
            # its rows in use cost, not the whole slot count
            size = _bucket(len(live), 1, self.num_slots)
            rows = live + sorted(set(range(self.num_slots)) - set(live))[:size - len(live)]
            self.state, tokens = _decode(self.params, self.state, np.asarray(rows, np.int32),
                                         s=_Static(self.config, flags, self.vocab_limit),
                                         attend_len=self._attend_len(live))
            tokens = np.asarray(tokens)
            out += [(s, int(tokens[k])) for k, s in enumerate(live)]
            for s in live:
                self.lengths[s] += 1
        return out

    def warmup(self, kinds: Sequence[SamplingParams], attend_lens=(128, 256)) -> int:
        """Compile the decode step for every row-count bucket, each kind of sampling in
        `kinds` and each of `attend_lens` (capped at the cache), by running it on free slots
        (which keep nothing), so that a server does not compile while it serves. Call it
        while no slot is in use; returns the number of programs run."""
        if self.busy:
            raise ValueError("warmup needs every slot free")
        sizes = sorted({_bucket(n, 1, self.num_slots) for n in range(1, self.num_slots + 1)})
        lengths = sorted({min(self.max_seq_len, n) for n in attend_lens})
        flags = list(dict.fromkeys(RowFlags.of([p]) for p in kinds))
        for f in flags:
            for size in sizes:
                for n in lengths:
                    self.state, tokens = _decode(self.params, self.state,
                                                 np.arange(size, dtype=np.int32),
                                                 s=_Static(self.config, f, self.vocab_limit),
                                                 attend_len=n)
        jax.block_until_ready(tokens)
        return len(flags) * len(sizes) * len(lengths)

    def _attend_len(self, live) -> int:
        """Cache slots the decode step reads: the longest live row's keys after this step,
        rounded up to a power of two >= 128 (a few programs; short rows read little)."""
        need = max(self.lengths[s] for s in live) + 1
        return _bucket(need, 128, self.max_seq_len)

    def _prefill_chunk(self, p: _Pending) -> list[tuple[int, int]]:
        size, n_real = p.plan[0]
        tokens = np.zeros((1, size), np.int32)
        tokens[0, :n_real] = p.prompt[p.done:p.done + n_real]
        start, last = p.done == 0, len(p.plan) == 1
        s = _Static(self.config, RowFlags.of([p.params]), self.vocab_limit)
        self.state, token = _prefill(
            self.params, self.state, np.int32(p.slot), tokens, np.int32(n_real), np.bool_(start),
            np.bool_(last), np.int32(len(p.prompt)), RowSampling.of(p.params),
            jax.random.PRNGKey(p.seed), np.int32(p.row), s=s)
        p.done += n_real
        p.plan.pop(0)
        if not last:
            return []
        self.pending.remove(p)
        self.params_of[p.slot] = p.params
        self.lengths[p.slot] = len(p.prompt)
        return [(p.slot, int(token))]
