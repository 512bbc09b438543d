"""Logits processors and token selection with the semantics of Hugging Face `generate` as the
released Qwen v1 generation configs use it.

Order (as in transformers): repetition penalty, then, when sampling, temperature, top-k,
top-p; greedy decoding takes the argmax after the repetition penalty. Removed tokens get -inf.
All functions take float32 logits [B, V] and run under jit; which processors are active is
static (`SamplingParams` is hashable), so disabled ones cost nothing.

`GenerationConfig` holds a release's `generation_config.json` (sampling, stops, lengths).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from qwen_jax.data import chat_format
from qwen_jax.data.tokenizer import QWEN_NUM_RANKS, SPECIAL_TOKEN_STRINGS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    # Ids >= this are never chosen (0 = no limit): the model's vocabulary is padded past the
    # tokenizer's (151936 vs 151851), and those ids cannot be decoded.
    vocab_limit: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: expected > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: expected > 0")


def repetition_penalty(logits, seen, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor: for tokens already in the sequence (`seen` [B, V]
    bool), a negative logit is multiplied by `penalty`, any other divided by it."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def top_k_filter(logits, k: int):
    """Keep the k largest logits (and every logit tied with the k-th), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_k_rows(logits, k):
    """`top_k_filter` with each row's own k ([B] int; 0 = off)."""
    desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    return jnp.where((k[:, None] > 0) & (logits < kth), -jnp.inf, logits)


def top_p_filter(logits, top_p):
    """HF TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is
    <= 1 - top_p, always keep the most likely one. `top_p` a float or [B, 1] (per row)."""
    order = jnp.argsort(logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits, seen, params: SamplingParams):
    """The scores a token is chosen from (greedy: argmax of them; sampling: softmax of them)."""
    logits = logits.astype(jnp.float32)
    if 0 < params.vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) >= params.vocab_limit, -jnp.inf, logits)
    if params.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def select_tokens(logits, seen, params: SamplingParams, key, step):
    """Next token of every row [B] int32. Each row draws with its own key (the step and its
    row index folded into `key`), so a seed reproduces the same samples."""
    scores = process_logits(logits, seen, params)
    if not params.do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(scores.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)


@flax.struct.dataclass
class RowSampling:
    """Per-row sampling parameters (a slot decoder's batch mixes requests): each [B]."""

    do_sample: jax.Array  # bool
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1.0 = off
    repetition_penalty: jax.Array  # float32, 1.0 = off

    @classmethod
    def of(cls, params: SamplingParams, rows: int = 1) -> "RowSampling":
        def full(value, dtype):
            return jnp.full((rows,), value, dtype)
        return cls(full(params.do_sample, bool), full(params.temperature, jnp.float32),
                   full(params.top_k, jnp.int32), full(params.top_p, jnp.float32),
                   full(params.repetition_penalty, jnp.float32))


@dataclasses.dataclass(frozen=True)
class RowFlags:
    """Which processors any row of a call uses (static: the others cost nothing)."""

    penalty: bool = False
    sample: bool = False
    top_k: bool = False
    top_p: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> "RowFlags":
        sampled = [p for p in params if p.do_sample]
        return cls(any(p.repetition_penalty != 1.0 for p in params), bool(sampled),
                   any(p.top_k > 0 for p in sampled), any(p.top_p < 1.0 for p in sampled))


def select_tokens_rows(logits, seen, rows: RowSampling, flags: RowFlags, vocab_limit: int,
                       keys, steps, row_ids):
    """`select_tokens` with each row's own parameters, key, step and row number: a row gets
    the token `select_tokens` gives it in any batch of rows with its parameters (the same
    processors in the same order, the same key folding)."""
    logits = logits.astype(jnp.float32)
    if 0 < vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) >= vocab_limit, -jnp.inf, logits)
    if flags.penalty:
        pen = rows.repetition_penalty[:, None]
        logits = jnp.where(pen != 1.0, repetition_penalty(logits, seen, pen), logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not flags.sample:
        return greedy
    scores = jnp.where(rows.temperature[:, None] != 1.0,
                       logits / rows.temperature[:, None], logits)
    if flags.top_k:
        scores = top_k_rows(scores, jnp.minimum(rows.top_k, scores.shape[-1]))
    if flags.top_p:
        top_p = rows.top_p[:, None]
        scores = jnp.where(top_p < 1.0, top_p_filter(scores, top_p), scores)
    keys = jax.vmap(lambda k, s, r: jax.random.fold_in(jax.random.fold_in(k, s), r))(
        keys, steps, row_ids)
    sampled = jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)
    return jnp.where(rows.do_sample, sampled, greedy)


def mark_seen(seen, tokens, valid=None):
    """Add `tokens` ([B] or [B, T]) to the per-row presence mask `seen` [B, V]."""
    tokens = tokens.reshape(tokens.shape[0], -1)
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.reshape(tokens.shape)
    rows = jnp.arange(tokens.shape[0])[:, None]
    return seen.at[rows, tokens].max(valid)


GENERATION_CONFIG_FILE = "generation_config.json"


class GenerationError(ValueError):
    """Generation inputs that cannot work (empty prompt, prompt longer than the cache...)."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What `generation_config.json` of a release holds. Defaults (no file): Qwen's base
    generation config (sampling, top_p 0.8, top_k off, 512 new tokens)."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.8
    repetition_penalty: float = 1.0
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # single stop tokens are 1-long sequences
    pad_token_id: int = 0
    chat_format: str = "raw"
    max_window_size: int = 6144
    vocab_limit: int = 0  # ids >= this are never generated (the CLIs: the tokenizer's size)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise GenerationError("an empty stop sequence")
        self.sampling  # validates the sampling fields

    @property
    def sampling(self) -> SamplingParams:
        try:
            return SamplingParams(self.do_sample, float(self.temperature),
                                           int(self.top_k), float(self.top_p),
                                           float(self.repetition_penalty),
                                           int(self.vocab_limit))
        except ValueError as e:
            raise GenerationError(str(e)) from None

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict, tokenizer) -> "GenerationConfig":
        """From a released generation_config.json: stops = eos_token_id + stop_words_ids + the
        chat format's stop tokens. Ids of Qwen special tokens map onto `tokenizer`'s (the
        byte-level fallback numbers them differently); keys it lacks take the Qwen defaults."""
        def ids(value):
            value = value if isinstance(value, list) else [value]
            return tuple(_special_id(int(i), tokenizer) for i in value if i is not None)

        fmt = data.get("chat_format", "raw")
        if fmt not in ("raw", "chatml"):
            raise GenerationError(f"chat_format={fmt!r}: expected 'raw' or 'chatml'")
        stops = [(i,) for i in ids(data.get("eos_token_id"))]
        stops += [ids(s) for s in data.get("stop_words_ids") or []]
        if fmt == "chatml":
            stops += [tuple(s) for s in chat_format.stop_words_ids(tokenizer, fmt)]
        pad = data.get("pad_token_id")
        fields = {k: data[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_k",
                                       "top_p", "repetition_penalty", "max_window_size")
                  if data.get(k) is not None}
        return cls(**fields, chat_format=fmt, stop_sequences=tuple(dict.fromkeys(stops)),
                   pad_token_id=tokenizer.eod_id if pad is None else _special_id(pad, tokenizer))


def _special_id(token_id: int, tokenizer) -> int:
    offset = token_id - QWEN_NUM_RANKS
    if 0 <= offset < len(SPECIAL_TOKEN_STRINGS):
        return tokenizer.special_tokens[SPECIAL_TOKEN_STRINGS[offset]]
    return token_id


def load_generation_config(directory, tokenizer, path=None) -> GenerationConfig:
    """`path`, else DIR/generation_config.json, else the base defaults stopping at eod."""
    if path is not None and not pathlib.Path(path).is_file():
        raise GenerationError(f"{path}: no such generation config file")
    path = pathlib.Path(path or pathlib.Path(directory) / GENERATION_CONFIG_FILE)
    if not path.is_file():
        return GenerationConfig(stop_sequences=((tokenizer.eod_id,),),
                                pad_token_id=tokenizer.eod_id)
    try:
        return GenerationConfig.from_dict(json.loads(path.read_text()), tokenizer)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise GenerationError(f"{path}: not a valid generation config ({e})") from None
