"""Text generation with a fixed-size KV cache: one compiled prefill, then the decode steps,
compiled once: without a stream callback all in one `lax.while_loop` (no host round trip per
token: ~3-4x the tokens/s of a Python loop on a small model, CPU); with one, a Python loop over
one jitted step (the token reaches the callback on the calling thread; io_callback inside the
while loop measured no faster). Both give the same tokens; `loop=` forces one.

    result = generate(params, config, [[ids...], [ids...]], GenerationConfig(...), seed=0,
                      stream=callback, return_logits=False)

Prompts are LEFT padded to a common length (rounded up to `pad_to_multiple` so that prompt
lengths share compilations); padding has segment id 0, so every row has its own positions and
NTK level and gets exactly what it gets alone. All rows write one shared cache slot per step.
`kv_cache="int8"` stores the cache as the original's `use_cache_quantization` does (uint8 with
a float32 scale/zero per row, head and appended chunk: about half the memory of bf16;
`qwen_jax.model.kv_cache`); padding is left out of a row's scale/zero, so a padded row still
gets what it gets alone.
A row that hits a stop sequence emits `pad_token_id` from then on while the others go on.

CLI: python -m qwen_jax.generate --checkpoint DIR (--prompt TEXT | --prompts-file FILE) [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from qwen_jax.cli import CLIError, Parser, add_kv_cache_arg, add_model_args, load_model, run_cli
from qwen_jax.infer import sampling
from qwen_jax.infer.sampling import GenerationConfig, GenerationError, load_generation_config
from qwen_jax.io.checkpoint import side_files_dir
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import KVCache, cache_bytes, cache_dtype, init_cache
from qwen_jax.model.transformer import Qwen

__all__ = ["GenerationConfig", "GenerationError", "GenerationResult", "TextStreamer", "generate",
           "load_generation_config", "main"]


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, N] int32: generated ids (stop sequence included), then pad
    num_tokens: np.ndarray  # [B] ids each row generated, its stop sequence included
    stop_len: np.ndarray  # [B] length of the stop sequence that ended the row (0: none)
    logits: np.ndarray | None  # [B, N, V] float32 raw logits each token was chosen from
    # (after a row stops: those of its pad inputs; after all stop: zeros)
    cache_slots: int  # the KV cache's length (padded prompt + max_new_tokens by default)
    cache_bytes: int

    @property
    def stopped(self) -> np.ndarray:
        return self.stop_len > 0

    def completion(self, row: int) -> list[int]:
        """The row's generated ids without its stop sequence."""
        return self.tokens[row, :self.num_tokens[row] - self.stop_len[row]].tolist()


@flax.struct.dataclass
class _State:
    cache: KVCache
    token: jax.Array  # [B] the last token, input of the next step
    done: jax.Array  # [B] bool
    num: jax.Array  # [B] tokens emitted
    stop_len: jax.Array  # [B]
    step: jax.Array  # []
    out: jax.Array  # [B, N]
    recent: jax.Array  # [B, W] the last W tokens (prompt included), for stop sequences
    seen: jax.Array | None  # [B, V] bool, for the repetition penalty
    key: jax.Array
    logits: jax.Array | None  # [B, N, V]


@dataclasses.dataclass(frozen=True)
class _Static:  # everything the compiled functions specialise on besides shapes
    config: QwenConfig
    sampling: sampling.SamplingParams
    stops: tuple[tuple[int, ...], ...]
    pad_id: int


def _last_position(hidden, to_logits):
    # Prefill needs the logits of the last position only; slicing the logits would still
    # compute (and hold) [B, T, V] float32, so the hidden state is sliced before lm_head.
    return to_logits(hidden[:, -1:])


def _emit(state: _State, logits, s: _Static) -> tuple[_State, tuple]:
    """Choose each row's next token from `logits` [B, V] and record it."""
    active = ~state.done
    token = sampling.select_tokens(logits, state.seen, s.sampling, state.key, state.step)
    token = jnp.where(active, token, s.pad_id)
    recent = jnp.concatenate([state.recent[:, 1:], token[:, None]], axis=1)
    match = jnp.zeros_like(token)
    for seq in s.stops:
        hit = jnp.all(recent[:, -len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)
        match = jnp.maximum(match, jnp.where(hit, len(seq), 0))
    ended = active & (match > 0)
    state = state.replace(
        token=token, done=state.done | ended, num=state.num + active,
        stop_len=jnp.where(ended, match, state.stop_len), step=state.step + 1,
        out=jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step)),
        recent=recent,
        seen=None if state.seen is None else sampling.mark_seen(state.seen, token, active),
        logits=None if state.logits is None else jax.lax.dynamic_update_slice(
            state.logits, logits[:, None], (0, state.step, 0)))
    return state, (token, active, state.done)


@functools.partial(jax.jit, static_argnames=("s", "num_new", "return_logits"))
def _prefill(params, tokens, segment_ids, cache, key, *, s: _Static, num_new: int,
             return_logits: bool):
    logits, cache = Qwen(s.config).apply({"params": params}, tokens, segment_ids=segment_ids,
                                         cache=cache, head=_last_position)
    batch, vocab = tokens.shape[0], s.config.vocab_size
    width = max([len(q) for q in s.stops] + [1])
    recent = jnp.where(segment_ids > 0, tokens, -1)[:, -width:]
    recent = jnp.pad(recent, ((0, 0), (width - recent.shape[1], 0)), constant_values=-1)
    seen = None
    if s.sampling.repetition_penalty != 1.0:
        seen = sampling.mark_seen(jnp.zeros((batch, vocab), bool), tokens, segment_ids > 0)
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _State(cache=cache, token=zeros, done=zeros.astype(bool), num=zeros,
                   stop_len=zeros, step=jnp.zeros((), jnp.int32),
                   out=jnp.full((batch, num_new), s.pad_id, jnp.int32), recent=recent,
                   seen=seen, key=key,
                   logits=jnp.zeros((batch, num_new, vocab)) if return_logits else None)
    return _emit(state, logits[:, -1], s)


def _decode(params, state: _State, s: _Static):
    logits, cache = Qwen(s.config).apply({"params": params}, state.token[:, None],
                                         cache=state.cache)
    return _emit(state.replace(cache=cache), logits[:, -1], s)


# The state (cache included) is donated: each step updates it in place, no copy per token.
_step = jax.jit(_decode, static_argnames=("s",), donate_argnames=("state",))
_STREAM: list[Callable | None] = [None]  # the while loop's streaming target (set per call)


def _stream_hook(token, active, done):
    if _STREAM[0] is not None:
        _STREAM[0](np.asarray(token), np.asarray(active))


@functools.partial(jax.jit, static_argnames=("s", "streaming"), donate_argnames=("state",))
def _run_while(params, state: _State, *, s: _Static, streaming: bool):
    def body(state):
        state, info = _decode(params, state, s)
        if streaming:
            jax.experimental.io_callback(_stream_hook, None, *info, ordered=True)
        return state

    num_new = state.out.shape[1]
    return jax.lax.while_loop(lambda st: (st.step < num_new) & ~jnp.all(st.done), body, state)


def generate(params, config: QwenConfig, prompts: Sequence[Sequence[int]],
             gen: GenerationConfig | None = None, *, seed: int = 0, max_length: int | None = None,
             stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
             return_logits: bool = False, loop: str = "auto",
             pad_to_multiple: int = 64, kv_cache: str | None = None) -> GenerationResult:
    """Generate from a batch of token-id prompts.

    max_length: cache slots (padded prompt + new tokens); default the padded prompt length plus
      max_new_tokens. A prompt that leaves no room for max_new_tokens raises GenerationError.
    stream(tokens [B], active [B] bool): called once per step, in order; `active` is False for
      rows that had already stopped (their token is pad).
    loop: "auto" ("while" without `stream`, else "python"), "python" (one jitted step per
      token, the next dispatched before the current token is read back) or "while" (one
      lax.while_loop; streaming through io_callback).
    kv_cache: None (the compute dtype), a float dtype ("bf16", "float32", ...) or "int8" (the
      original's quantised cache: uint8 + float32 scale/zero per row, head and chunk).
    """
    gen = gen or GenerationConfig()
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} outside the model vocabulary "
                              f"[0, {config.vocab_size})")
    try:
        cache_dtype(kv_cache)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if loop not in ("auto", "python", "while"):
        raise GenerationError(f"loop={loop!r}: expected 'auto', 'python' or 'while'")
    loop = ("python" if stream is not None else "while") if loop == "auto" else loop
    longest, num_new = max(map(len, prompts)), gen.max_new_tokens
    padded = -(-longest // pad_to_multiple) * pad_to_multiple
    if max_length is None:
        max_length = padded + num_new
    padded = min(padded, max_length - num_new)
    if longest > padded:
        raise GenerationError(f"a prompt of {longest} tokens plus max_new_tokens={num_new} does "
                              f"not fit max_length={max_length} cache slots")
    tokens = np.zeros((len(prompts), padded), np.int32)
    segment_ids = np.zeros_like(tokens)
    for row, p in enumerate(prompts):
        tokens[row, padded - len(p):] = p
        segment_ids[row, padded - len(p):] = 1
    s = _Static(config, gen.sampling, tuple(tuple(q) for q in gen.stop_sequences),
                gen.pad_token_id)
    cache = init_cache(config, len(prompts), max_length, kv_cache)
    state, info = _prefill(params, tokens, segment_ids, cache, jax.random.PRNGKey(seed), s=s,
                           num_new=num_new, return_logits=return_logits)
    if loop == "while":
        if stream is not None:
            stream(*to_host(info[:2]))
        _STREAM[0] = stream
        try:
            state = _run_while(params, state, s=s, streaming=stream is not None)
            jax.effects_barrier()
        finally:
            _STREAM[0] = None
    else:
        pending = info
        for _ in range(1, num_new):
            state, info = _step(params, state, s)  # dispatched before `pending` is read back
            if _deliver(pending, stream):
                pending = None
                break
            pending = info
        if pending is not None:
            _deliver(pending, stream)
    out, num, stop_len, logits = to_host((state.out, state.num, state.stop_len, state.logits))
    return GenerationResult(out, num, stop_len, logits, max_length,
                            cache_bytes(config, len(prompts), max_length, kv_cache))


def to_host(tree):
    """numpy copies of the arrays in `tree`; one that spans other processes' devices (a
    multi-process mesh) is gathered from all of them first."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def _deliver(info, stream) -> bool:
    token, active, done = to_host(info)
    if stream is not None:
        stream(token, active)
    return bool(done.all())


class TextStreamer:
    """Prints one row's new text as tokens arrive (special tokens left out; an incomplete
    UTF-8 character is held back until its last byte comes)."""

    def __init__(self, tokenizer, row: int = 0, out=None):
        self.tokenizer, self.row, self.out = tokenizer, row, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens, active):
        token = int(tokens[self.row])
        if not active[self.row] or self.tokenizer.is_special(token):
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


# ----------------------------------------------------------------------------- command line
def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation-config", help="generation_config.json to use (default: the "
                   "checkpoint's, else Qwen's base defaults)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-length", type=int, help="KV cache slots (prompt + new tokens)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--top-p", type=float, help="1.0 = off")
    p.add_argument("--repetition-penalty", type=float, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)


def generation_config_from_args(args, tokenizer) -> GenerationConfig:
    gen = load_generation_config(side_files_dir(args.checkpoint), tokenizer,
                                 args.generation_config)
    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    gen = gen.replace(**{k: v for k, v in flags.items() if v is not None},
                      vocab_limit=tokenizer.vocab_size)
    return gen.replace(do_sample=False) if args.greedy else gen


def describe_cache(config: QwenConfig, batch: int, max_length: int, kv_cache=None) -> str:
    kind = cache_dtype(kv_cache)
    kind = ("int8 (uint8 + float32 scale/zero)" if kind == "int8"
            else str(kind or config.dtype))
    return (f"kv cache: {batch} x {max_length} slots, {kind}, "
            f"{cache_bytes(config, batch, max_length, kv_cache) / 2**20:.2f} MiB")


def _main(argv=None) -> int:
    p = Parser(prog="python -m qwen_jax.generate", description="Generate text from prompts.")
    add_model_args(p)
    add_kv_cache_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its completion is streamed to stdout")
    src.add_argument("--prompts-file", help="one prompt per line; one JSON line out per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (file input)")
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.prompts_file is not None:
        lines = pathlib.Path(args.prompts_file).read_text().splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise CLIError(f"{args.prompts_file}: no prompts (the file has no non-empty line)")
    else:
        if not args.prompt:
            raise CLIError("--prompt is empty")
        prompts = [args.prompt]
    params, config, tokenizer = load_model(args)
    gen = generation_config_from_args(args, tokenizer)
    for start in range(0, len(prompts), max(1, args.batch_size)):
        batch = prompts[start:start + max(1, args.batch_size)]
        ids = [tokenizer.encode(text) for text in batch]
        length = args.max_length or None
        streamer = TextStreamer(tokenizer) if args.prompt is not None else None
        t0 = time.perf_counter()
        result = generate(params, config, ids, gen, seed=args.seed, max_length=length,
                          stream=streamer, kv_cache=args.kv_cache)
        elapsed = time.perf_counter() - t0
        print(describe_cache(config, len(batch), result.cache_slots, args.kv_cache),
              file=sys.stderr)
        print(f"generated {int(result.num_tokens.sum())} tokens in {elapsed:.2f} s",
              file=sys.stderr)
        for row, text in enumerate(batch):
            if streamer is not None:
                print()
            else:
                print(json.dumps({"prompt": text, "completion": tokenizer.decode(
                    result.completion(row), skip_special_tokens=True),
                    "num_tokens": int(result.num_tokens[row]),
                    "stopped": bool(result.stopped[row])}, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv, errors=(GenerationError,))


if __name__ == "__main__":
    sys.exit(main())
