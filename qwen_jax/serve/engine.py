"""The serving engine: one background thread owns the model and runs every decode.

Requests enter a bounded FIFO queue (`submit` raises `QueueFull` past `max_queue` waiting
requests). The thread takes the oldest waiting request and, behind it, every waiting request
that can share its batch (the same `Sampling` and token stop sequences, no `seed` of its own)
while their rows (choices) fit `max_batch` and the longest prompt plus the largest max_tokens
fit the context, and runs them together through our batched `generate` (left padding: each
row gets what it gets alone; greedy ids are the same as alone). A sampling request with a
`seed` runs alone, its choices as rows 0..n-1, so that the seed reproduces its samples
whatever else is waiting.

Tokens come back through `generate`'s `stream` callback and are turned, per choice, into text
deltas (decoded from all the choice's ids each step; an incomplete UTF-8 character and an end
that may begin a stop string are held back) put on the request's asyncio queue with
`call_soon_threadsafe`. A choice ends at a token stop sequence (the stop itself left out), at
a stop string (the text cut before it, as OpenAI does), or at its `max_tokens` ("length").
A finished row (one that ended, was cancelled or whose deadline passed) keeps decoding padding
until the whole batch ends: the batch ends early only when all its rows have, by raising out
of the stream callback. Continuous batching (newcomers joining a running batch) is not done.

Shapes are bucketed so that few programs compile: the batch is padded with copies of its first
row to a power of two (at most `max_batch`), new tokens to a power of two >= 16, the prompt to
generate's multiple of 64; near the context limit the cache is the context (`max_seq_len`).
A failing batch fails its requests only (a 500 for each), never the engine.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import threading
import time
import traceback
from typing import Callable, Sequence

log = logging.getLogger("qwen_jax.serve")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What every row of one batch must share (generate compiles per value)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class EngineError(Exception):
    """A request the engine refuses or could not finish: an HTTP status and OpenAI error."""

    def __init__(self, status: int, message: str, type: str = "server_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param)


class QueueFull(EngineError):
    def __init__(self, max_queue: int):
        super().__init__(429, f"the server's queue is full ({max_queue} requests waiting); "
                         "retry later", "rate_limit_error", "queue_full")


@dataclasses.dataclass
class Event:
    kind: str  # "delta" (text), "finish" (last text, finish_reason, tokens), "error", "done"
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: EngineError | None = None


class Choice:
    """One generated sequence (one batch row) of a request."""

    def __init__(self, index: int, prompt: list[int]):
        self.index, self.prompt = index, prompt
        self.ids: list[int] = []
        self.sent = ""  # the text already sent
        self.finished: str | None = None


class Request:
    """What the engine needs of one API request. Create it on the event loop that reads its
    `events` (None: a request without a reader, e.g. the warm-up)."""

    def __init__(self, prompts: Sequence[Sequence[int]], *, n: int = 1,
                 sampling: Sampling = Sampling(), max_tokens: int = 16,
                 stop: Sequence[str] = (), stop_ids: Sequence[Sequence[int]] = (),
                 seed: int | None = None, timeout: float | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, limit: int | None = None):
        self.choices = [Choice(k * n + j, list(p)) for k, p in enumerate(prompts)
                        for j in range(n)]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.sampling, self.max_tokens, self.seed = sampling, max_tokens, seed
        self.stop = [s for s in stop if s]
        self.stop_ids = tuple(tuple(s) for s in stop_ids)
        self.arrived = time.monotonic()
        self.deadline = None if timeout is None else self.arrived + timeout
        self.loop, self.limit = loop, limit  # limit: stop after this many tokens (warm-up)
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = False
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.error: str | None = None

    @property
    def longest(self) -> int:
        return max(len(c.prompt) for c in self.choices)

    @property
    def key(self):
        return (self.sampling, self.stop_ids)

    def cancel(self) -> None:
        """Stop working on the request (client gone): dropped from the queue when the engine
        next looks, its rows' output discarded."""
        self.cancelled = True

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline

    def put(self, event: Event) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass


class _BatchDone(Exception):
    """Raised from the stream callback when every row of the batch has ended."""


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def plan_lengths(longest: int, need: int, max_seq_len: int, multiple: int = 64):
    """(max_new_tokens, max_length) for generate: new tokens rounded up to a power of two
    (>= 16) with generate's own cache (prompt padded to `multiple` + new tokens) while that
    fits the context; past it the cache is the context and the new tokens are rounded to a
    multiple of 64 that still fits the longest prompt."""
    padded = -(-longest // multiple) * multiple
    num_new = next_pow2(max(need, 16))
    if padded + num_new <= max_seq_len:
        return num_new, None
    return max(need, min(-(-need // 64) * 64, max_seq_len - longest)), max_seq_len


class Engine:
    """generate_fn(prompts, gen, *, seed, max_length, stream) runs one batch (our `generate`
    with the model bound); `gen` is the checkpoint's GenerationConfig, which the engine
    specialises per batch."""

    def __init__(self, generate_fn: Callable, tokenizer, gen, *, max_batch: int = 8,
                 max_queue: int = 64, max_seq_len: int = 2048, metrics=None,
                 warmup: Sequence[Request] = ()):
        self.generate_fn, self.tokenizer, self.gen = generate_fn, tokenizer, gen
        self.max_batch, self.max_queue, self.max_seq_len = max_batch, max_queue, max_seq_len
        self.metrics, self.warmup = metrics, list(warmup)
        self.queue: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.running: list[Request] = []
        self.ready = threading.Event()
        self.failed: str | None = None
        self.closing = self.stopped = False
        self.on_fatal: Callable[[str], None] | None = None
        self.thread = threading.Thread(target=self._main, name="qwen-jax-engine", daemon=True)

    # ------------------------------------------------------------------ the event loop side
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.closing:
                raise EngineError(503, "the server is shutting down", code="shutting_down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self.queue.append(req)
            self._gauges()
            self.cond.notify_all()

    def close(self, grace: float = 0.0, join_timeout: float = 10.0) -> bool:
        """Refuse new requests, let the queued and running ones finish for up to `grace`
        seconds, cancel the rest (a 503 for each) and stop the thread. True when it stopped."""
        end = time.monotonic() + grace
        with self.cond:
            self.closing = True
            while (self.queue or self.running) and time.monotonic() < end:
                self.cond.wait(min(0.1, max(0.0, end - time.monotonic())))
            for req in list(self.queue) + self.running:
                req.cancel()
                req.put(Event("error", error=EngineError(
                    503, "the server shut down before the request finished",
                    code="shutting_down")))
            self.queue.clear()
            self.stopped = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(join_timeout)
        return not self.thread.is_alive()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))
            self.metrics.running.set(len(self.running))

    # ------------------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            start = time.perf_counter()
            for req in self.warmup:  # compile the common shapes before reporting ready
                self._run_batch([req])
                if any(c.finished == "error" for c in req.choices):
                    raise RuntimeError(f"warm-up failed: {req.error}")
            if self.warmup:
                log.info("warm-up: %d batches compiled in %.1f s", len(self.warmup),
                         time.perf_counter() - start)
            self.ready.set()
            while True:
                batch = self._take()
                if batch is None:
                    return
                self._run_batch(batch)
        except BaseException as e:  # the engine must say why it stopped
            self.failed = f"{type(e).__name__}: {e}"
            log.error("engine stopped: %s\n%s", self.failed, traceback.format_exc())
            with self.cond:
                self.closing = True
                for req in list(self.queue) + self.running:
                    req.put(Event("error", error=EngineError(500, "engine stopped: "
                                                             + self.failed)))
                self.queue.clear()
            if self.on_fatal is not None:
                self.on_fatal(self.failed)

    def _take(self) -> list[Request] | None:
        """The next batch (the oldest request and those that can join it); None at close."""
        with self.cond:
            while True:
                now = time.monotonic()
                for req in [r for r in self.queue if r.cancelled or r.expired(now)]:
                    self.queue.remove(req)
                    if not req.cancelled:
                        req.put(Event("error", error=_timeout_error()))
                self._gauges()
                if self.stopped:
                    return None
                if self.queue:
                    break
                if self.metrics is not None:
                    self.metrics.idle()
                self.cond.wait(0.5)
            first = self.queue.popleft()
            batch, rows = [first], len(first.choices)
            longest, need = first.longest, first.max_tokens
            for req in list(self.queue) if first.seed is None else []:
                # The batch's longest prompt and largest max_tokens must fit the context
                # together (rows are left padded to the longest prompt).
                if (req.seed is None and req.key == first.key
                        and rows + len(req.choices) <= self.max_batch
                        and max(longest, req.longest) + max(need, req.max_tokens)
                        <= self.max_seq_len):
                    self.queue.remove(req)
                    batch.append(req)
                    rows += len(req.choices)
                    longest, need = max(longest, req.longest), max(need, req.max_tokens)
            self.running = batch
            self._gauges()
            return batch

    def _run_batch(self, batch: list[Request]) -> None:
        rows = [(req, c) for req in batch for c in req.choices]
        first = batch[0]
        prompts = [c.prompt for _, c in rows]
        size = min(next_pow2(len(rows)), max(self.max_batch, len(rows)))
        prompts += [prompts[0]] * (size - len(rows))
        need = max(req.max_tokens for req in batch)
        num_new, max_length = plan_lengths(max(map(len, prompts)), need, self.max_seq_len)
        s = first.sampling
        gen = self.gen.replace(max_new_tokens=num_new, do_sample=s.do_sample,
                               temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               repetition_penalty=s.repetition_penalty,
                               stop_sequences=first.stop_ids)
        seed = first.seed if first.seed is not None else random.getrandbits(31)
        if self.metrics is not None:
            self.metrics.batch_rows.set(len(rows))
            if first.loop is not None:  # not the warm-up
                self.metrics.batch_size.observe(len(rows))
            self.metrics.prompt_tokens.inc(sum(r.prompt_tokens for r in batch))

        def stream(tokens, active):
            now, count = time.monotonic(), 0
            for row, (req, c) in enumerate(rows):
                if c.finished:
                    continue
                if req.cancelled or req.expired(now):
                    self._finish(req, c, "cancelled", "")
                elif not active[row]:  # generate ended the row (a stop we did not see)
                    self._finish(req, c, "stop", self._text(req, c.ids)[0][len(c.sent):])
                else:
                    self._advance(req, c, int(tokens[row]), now)
                    count += 1
            if self.metrics is not None:
                self.metrics.add_tokens(count)
            if all(c.finished for _, c in rows):
                raise _BatchDone

        try:
            self.generate_fn(prompts, gen, seed=seed, max_length=max_length, stream=stream)
        except _BatchDone:
            pass
        except Exception as e:  # contained to this batch's requests
            log.error("batch of %d requests failed: %s\n%s", len(batch), e,
                      traceback.format_exc())
            for req in batch:
                req.error = f"{type(e).__name__}: {e}"
                for c in req.choices:
                    c.finished = c.finished or "error"
                req.put(Event("error", error=EngineError(
                    500, f"generation failed: {type(e).__name__}: {e}")))
        finally:
            for req, c in rows:  # rows generate ran out of tokens for
                if not c.finished:
                    text = self._text(req, c.ids)[0]
                    self._finish(req, c, "length" if len(c.ids) >= num_new else "stop",
                                 text[len(c.sent):])
            with self.cond:
                self.running = []
                self._gauges()
                self.cond.notify_all()
            if self.metrics is not None:
                self.metrics.batch_rows.set(0)

    # ------------------------------------------------------------------ one choice's text
    def _text(self, req: Request, ids: list[int]) -> tuple[str, bool]:
        """(text, ended): the decoded text of `ids` without a token stop sequence that ends
        them and cut before the first stop string; `ended` when either was found."""
        ended = False
        for seq in req.stop_ids:
            if len(ids) >= len(seq) and tuple(ids[-len(seq):]) == seq:
                ids, ended = ids[:-len(seq)], True
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if cuts:
            text, ended = text[:min(cuts)], True
        return text, ended

    def _advance(self, req: Request, c: Choice, token: int, now: float) -> None:
        c.ids.append(token)
        req.completion_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics is not None and req.loop is not None:
                self.metrics.ttft.observe(now - req.arrived)
        text, ended = self._text(req, c.ids)
        if ended:
            return self._finish(req, c, "stop", text[len(c.sent):])
        if len(c.ids) >= req.max_tokens or (req.limit and len(c.ids) >= req.limit):
            return self._finish(req, c, "length", text[len(c.sent):])
        # Hold back an incomplete character, a possible beginning of a stop string, and the
        # text of ids that may begin a token stop sequence.
        hold = max((k for seq in req.stop_ids for k in range(1, len(seq))
                    if tuple(c.ids[-k:]) == seq[:k]), default=0)
        if hold:
            text = self._text(req, c.ids[:-hold])[0]
        text = text.rstrip("\ufffd")
        text = text[:len(text) - _partial_stop(text, req.stop)]
        if len(text) > len(c.sent) and text.startswith(c.sent):
            req.put(Event("delta", c.index, text[len(c.sent):]))
            c.sent = text

    def _finish(self, req: Request, c: Choice, reason: str, text: str) -> None:
        c.finished = reason
        if reason not in ("cancelled", "error"):
            c.sent += text
            req.put(Event("finish", c.index, text, reason, len(c.ids)))
        if all(x.finished for x in req.choices):
            if self.metrics is not None and req.loop is not None:
                self.metrics.duration.observe(time.monotonic() - req.arrived)
            if req.expired() and not req.cancelled:
                req.put(Event("error", error=_timeout_error()))
            elif not req.cancelled:
                req.put(Event("done"))


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])),
               default=0)


def _timeout_error() -> EngineError:
    return EngineError(504, "the request ran past the server's --request-timeout",
                       "timeout_error", "request_timeout")
