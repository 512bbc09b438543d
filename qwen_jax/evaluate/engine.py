"""The evaluation engine: log-likelihoods and generations for many requests at once, on the
mesh, with a handful of compiled programs per task.

Scoring. A request is (context ids, continuation ids). Its row is the last `max_length` tokens
of context + continuation minus the final one; the continuation's tokens are the targets of
the row's last positions. Rows are sorted by length (longest first), and each row is padded
on the right to its bucket: the next power of two from 32 up to `max_length`. A batch holds
rows of one bucket only, always the same number of them (dummy rows fill a short batch), so a
task compiles one program per bucket it reaches. Padding on the right changes nothing for the
real positions (attention is causal). Log-softmax is computed in float32 from the float32
logits, a few positions of every row at a time, so that the [B, L, V] logits never exist at
once (LOGITS_TOKENS of them do).

Requests whose continuation is a single token and whose contexts are equal (MMLU's " A" to
" D") share one row: the log-probabilities of all of their tokens are read at the context's last
position in the same forward pass.

Generation runs through `qwen_jax.infer.generate.generate` with the prompts of a batch left
padded to their bucket and a fixed batch size, so programs are again one per bucket.

On a mesh the parameters are sharded as in training and each batch is split over the batch
axes (data x fsdp). In a multi-process run every process passes the same requests in the same
order; each gets every result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.infer.generate import GenerationConfig, generate, to_host
from qwen_jax.io.checkpoint import CheckpointError, load_checkpoint_tokenizer, load_config, \
    load_params
from qwen_jax.model.transformer import Qwen, param_shardings
from qwen_jax.parallel import sharding as shd

MIN_BUCKET = 32
MAX_CHOICES = 16  # single-token continuations read from one row (more: another row)
LOGITS_TOKENS = 1024  # tokens of a batch whose float32 logits exist at one time


class EvalError(ValueError):
    """A bad evaluation input (checkpoint, arguments, data) reported as one line."""


def bucket(n: int, limit: int) -> int:
    """The padded length of a row of n tokens: a power of two >= MIN_BUCKET, at most `limit`."""
    size = max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return min(size, limit)


def parse_mesh(value: str | Sequence[int]) -> tuple[int, ...]:
    """(data, fsdp, tensor) from a sequence or "data:fsdp:tensor" (commas work too)."""
    try:
        if isinstance(value, str):
            value = value.replace(",", ":").split(":")
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3:
        raise EvalError(f"mesh={value!r}: expected data:fsdp:tensor sizes, e.g. 1:-1:1 "
                        "(-1 = the remaining devices)")
    return shape


@functools.partial(jax.jit, static_argnames=("config",))
def score_rows(params, tokens, targets, last, candidates, *, config):
    """Per-position log p(target) and greedy flags [B, L] (float32, bool) of rows `tokens`
    [B, L] with `targets` [B, L] (the next token at each position), and at position `last`
    [B] the log-probabilities [B, K] and greedy flags of `candidates` [B, K]."""
    rows, length = tokens.shape
    chunk = min(length, 1 << max(0, (LOGITS_TOKENS // rows).bit_length() - 1))

    def head(hidden, to_logits):
        logp, greedy = [], []
        for start in range(0, length, chunk):
            logits = to_logits(hidden[:, start:start + chunk]).astype(jnp.float32)
            target = targets[:, start:start + chunk]
            picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
            logp.append(picked - jax.nn.logsumexp(logits, axis=-1))
            greedy.append(jnp.argmax(logits, axis=-1) == target)
        at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
        logits = to_logits(at_last)[:, 0].astype(jnp.float32)
        choice = (jnp.take_along_axis(logits, candidates, axis=-1)
                  - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        choice_greedy = candidates == jnp.argmax(logits, axis=-1)[:, None]
        return (jnp.concatenate(logp, axis=1), jnp.concatenate(greedy, axis=1), choice,
                choice_greedy)

    out, _ = Qwen(config).apply({"params": params}, tokens, head=head)
    return out


@dataclasses.dataclass
class _Row:
    tokens: list[int]
    requests: list[int]  # indices of the requests this row answers
    spans: list[int]  # for an ordinary row: how many final positions are the continuation
    choices: list[int] | None = None  # for a shared-context row: one token per request
    targets: list[int] | None = None  # for an ordinary row: the next token at each position


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()  # token ids that end a row besides <|endoftext|>


class Engine:
    """A checkpoint loaded for evaluation (see the module docstring)."""

    def __init__(self, checkpoint, *, dtype: str | None = None,
                 mesh: str | Sequence[int] = (1, -1, 1),
                 max_length: int | None = None, batch_tokens: int = 16384,
                 max_batch_size: int = 64, generation_batch_size: int = 16, seed: int = 0):
        directory = pathlib.Path(checkpoint)
        if not directory.is_dir():
            raise EvalError(f"{directory}: no such checkpoint directory")
        config = load_config(directory)
        if dtype:
            config = config.replace(dtype=dtype)
        self.tokenizer = load_checkpoint_tokenizer(directory)
        if self.tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(f"{directory}: tokenizer {self.tokenizer.name} has "
                                  f"{self.tokenizer.vocab_size} ids but the model only "
                                  f"{config.vocab_size}")
        shape, devices = parse_mesh(mesh), jax.devices()
        if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
            devices = devices[:math.prod(shape)]  # e.g. 1:1:1, one device of several
        try:
            self.mesh = shd.make_mesh(shape, devices)
        except shd.ShardingError as e:
            raise EvalError(f"mesh {shape}: {e}") from None
        self.params, self.config = load_params(directory, config,
                                               shardings=param_shardings(config, self.mesh))
        self.max_length = int(max_length or self.config.seq_length)
        if self.max_length < 2:
            raise EvalError(f"max_length={self.max_length}: expected >= 2")
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.generation_batch_size = generation_batch_size
        self.seed = seed
        self.shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.programs: set[tuple] = set()  # the shapes run: one compiled program each
        self.eod = self.tokenizer.eod_id

    # ------------------------------------------------------------------ scoring
    def batch_size(self, length: int) -> int:
        rows = max(1, min(self.max_batch_size, self.batch_tokens // length))
        rows = 1 << (rows.bit_length() - 1)
        return -(-rows // self.shards) * self.shards

    def _rows(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[_Row]:
        rows, shared = [], {}
        for i, (context, continuation) in enumerate(requests):
            context, continuation = list(context), list(continuation)
            if not continuation:
                raise EvalError(f"request {i}: an empty continuation")
            if not context:
                raise EvalError(f"request {i}: an empty context (start it from "
                                "<|endoftext|>)")
            whole = (context + continuation)[-(self.max_length + 1):]
            span = min(len(continuation), len(whole) - 1)
            if len(continuation) == 1:
                key = tuple(whole[:-1])
                row = shared.get(key)
                if row is None or len(row.choices) == MAX_CHOICES:
                    row = shared[key] = _Row(list(key), [], [], [])
                    rows.append(row)
                row.requests.append(i)
                row.choices.append(whole[-1])
            else:
                rows.append(_Row(whole[:-1], [i], [span], targets=whole[1:]))
        return rows

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress=None) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the whole
        continuation) of each (context ids, continuation ids), in request order."""
        rows = self._rows(requests)
        rows.sort(key=lambda r: -len(r.tokens))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        start = 0
        while start < len(rows):
            length = bucket(len(rows[start].tokens), self.max_length)
            size = self.batch_size(length)
            batch = rows[start:start + size]
            if bucket(len(batch[-1].tokens), self.max_length) != length:
                batch = [r for r in batch if bucket(len(r.tokens), self.max_length) == length]
            start += len(batch)
            self._score_batch(batch, length, size, results)
            if progress is not None:
                progress(sum(len(r.requests) for r in batch))
        return results

    def _score_batch(self, batch: list[_Row], length: int, size: int, results) -> None:
        tokens = np.full((size, length), self.eod, np.int32)
        targets = np.zeros((size, length), np.int32)
        last = np.zeros((size,), np.int32)
        candidates = np.zeros((size, MAX_CHOICES), np.int32)
        for b, row in enumerate(batch):
            n = len(row.tokens)
            tokens[b, :n] = row.tokens
            last[b] = n - 1
            if row.choices is not None:
                candidates[b, :len(row.choices)] = row.choices
            else:
                targets[b, :n] = row.targets
        self.programs.add(("score", size, length))
        with shd.activation_sharding(self.mesh):
            out = score_rows(self.params, tokens, targets, last, candidates, config=self.config)
        logp, greedy, choice, choice_greedy = to_host(out)
        for b, row in enumerate(batch):
            if row.choices is not None:
                for k, i in enumerate(row.requests):
                    results[i] = (float(choice[b, k]), bool(choice_greedy[b, k]))
            else:
                n, span = len(row.tokens), row.spans[0]
                part = slice(n - span, n)
                results[row.requests[0]] = (float(np.sum(logp[b, part], dtype=np.float64)),
                                            bool(np.all(greedy[b, part])))

    # ------------------------------------------------------------------ generation
    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens and without the ids past the
        tokenizer's vocabulary (the model's padded rows: nothing to decode, as transformers'
        decode with skip_special_tokens)."""
        vocab = self.tokenizer.vocab_size
        return self.tokenizer.decode([t for t in ids
                                      if t < vocab and not self.tokenizer.is_special(t)])

    def generate(self, requests: Sequence[GenerationRequest], progress=None) -> list[str]:
        """The text each request generates (special tokens dropped), cut before the first of
        its `until` strings, in request order."""
        ids = self.generate_ids(requests, progress)
        texts = []
        for q, row in zip(requests, ids):
            text = self.decode(row)
            for stop in q.until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def generate_ids(self, requests: Sequence[GenerationRequest], progress=None
                     ) -> list[list[int]]:
        """The ids each request generates, its stop sequence included, in request order.
        Requests with the same settings run together, longest prompt first."""
        out: list[list[int] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.until, r.max_new_tokens, r.do_sample, r.temperature, r.top_p, r.top_k,
                   r.stop_ids)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: -len(requests[i].prompt))
            size = -(-self.generation_batch_size // self.shards) * self.shards
            start = 0
            while start < len(members):
                first = requests[members[start]]
                room = self.max_length - first.max_new_tokens
                if room < 1:
                    raise EvalError(f"max_gen_toks={first.max_new_tokens} leaves no room for "
                                    f"a prompt in max_length={self.max_length}")
                length = bucket(min(len(first.prompt), room), room)
                chunk = [i for i in members[start:start + size]
                         if bucket(min(len(requests[i].prompt), room), room) == length]
                start += len(chunk)
                texts = self._generate_batch([requests[i] for i in chunk], length, size)
                for i, text in zip(chunk, texts):
                    out[i] = text
                if progress is not None:
                    progress(len(chunk))
        return out

    def _generate_batch(self, batch: list[GenerationRequest], length: int, size: int):
        r = batch[0]
        room = self.max_length - r.max_new_tokens
        prompts = [q.prompt[-room:] for q in batch]
        prompts += [prompts[0]] * (size - len(prompts))  # dummy rows: a fixed batch size
        stops = [(self.eod,)] + [(t,) for t in r.stop_ids]
        for text in r.until:
            ids = tuple(self.tokenizer.encode(text, allow_special=True))
            if ids:
                stops.append(ids)
        sampling = r.do_sample and r.temperature > 0
        gen = GenerationConfig(
            max_new_tokens=r.max_new_tokens, do_sample=sampling,
            temperature=r.temperature if sampling else 1.0,
            top_p=r.top_p if sampling else 1.0, top_k=r.top_k if sampling else 0,
            stop_sequences=tuple(dict.fromkeys(stops)), pad_token_id=self.eod)
        self.programs.add(("generate", size, length, r.max_new_tokens))
        with shd.activation_sharding(self.mesh):
            result = generate(self.params, self.config, prompts, gen, seed=self.seed,
                              max_length=length + r.max_new_tokens, pad_to_multiple=length)
        return [result.tokens[row, :result.num_tokens[row]].tolist()
                for row in range(len(batch))]


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr)
