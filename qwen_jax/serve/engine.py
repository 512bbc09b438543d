"""The serving engine: one background thread owns the decoder and runs every step.

Continuous batching. The decoder (`qwen_jax.infer.slots.SlotDecoder`, or anything with its
`num_slots` / `admit` / `step` / `release` / `reset`) holds `max_batch` slots: rows of one KV
cache that decode together in one compiled step, each with its own prompt, position,
sampling parameters and seed. Requests enter a bounded FIFO queue (`submit` raises `QueueFull`
past `max_queue` waiting requests); before every step the engine admits the oldest waiting
requests into free slots (a request's choices all at once), and the decoder prefills a
newcomer chunk by chunk between decode steps, so running requests keep decoding while it
joins. A choice that ends frees its slot at once: at a token stop sequence (the stop itself
left out), at a stop string (the text cut before it, as OpenAI does), at its `max_tokens`
("length"), at the context's end, when its client disconnects or its deadline passes
(within one step). Each row gets what it would get alone: the decoder's math is `generate`'s
(greedy ids identical; with a seed, the same samples, the choice index as the row number).

Tokens are turned, per choice, into text deltas (decoded from all the choice's ids each
step; an incomplete UTF-8 character and an end that may begin a stop string are held back)
put on the request's asyncio queue with `call_soon_threadsafe`.

A step that fails fails the requests in the slots (a 500 each) and empties the decoder; a
request the decoder refuses at admission fails alone. Neither stops the engine.
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

from qwen_jax.infer.sampling import SamplingParams

log = logging.getLogger("qwen_jax.serve")


# A request's sampling parameters are the decoder's (each slot has its own).
Sampling = SamplingParams


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


class Engine:
    """`decoder`: the slots (module doc); `max_seq_len`: the context a choice's prompt and
    completion share."""

    def __init__(self, decoder, tokenizer, *, max_queue: int = 64, max_seq_len: int = 2048,
                 metrics=None, warmup: Sequence[Request] = ()):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.max_batch, self.max_queue, self.max_seq_len = (decoder.num_slots, max_queue,
                                                            max_seq_len)
        self.metrics, self.warmup = metrics, list(warmup)
        self.queue: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.slots: dict[int, tuple[Request, Choice]] = {}  # slot -> its choice
        self.ready = threading.Event()
        self.failed: str | None = None
        self.closing = self.stopped = False
        self.on_fatal: Callable[[str], None] | None = None
        self.thread = threading.Thread(target=self._main, name="qwen-jax-engine", daemon=True)

    @property
    def running(self) -> list[Request]:
        return list(dict.fromkeys(req for req, _ in self.slots.values()))

    # ------------------------------------------------------------------ the event loop side
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        if len(req.choices) > self.max_batch:
            raise EngineError(400, f"{len(req.choices)} choices are more than the server's "
                              f"--max-batch {self.max_batch}", "invalid_request_error",
                              param="n")
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
            while (self.queue or self.slots) and time.monotonic() < end:
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
            self.metrics.batch_rows.set(len(self.slots))

    # ------------------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            start = time.perf_counter()
            warm = getattr(self.decoder, "warmup", None)
            if warm is not None and self.warmup:  # every slot count of the warm-up's kinds
                warm([r.sampling for r in self.warmup])
            for req in self.warmup:  # compile the common programs before reporting ready
                with self.cond:
                    self.queue.append(req)
                while not all(c.finished for c in req.choices):
                    self._iterate()
                if req.error is not None:
                    raise RuntimeError(f"warm-up failed: {req.error}")
            if self.warmup:
                log.info("warm-up: %d requests compiled in %.1f s", len(self.warmup),
                         time.perf_counter() - start)
            self.ready.set()
            while not self.stopped:
                if not self._iterate():
                    with self.cond:
                        if not (self.queue or self.slots or self.stopped):
                            if self.metrics is not None:
                                self.metrics.idle()
                            self.cond.wait(0.5)
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

    def _iterate(self) -> bool:
        """Admit what fits, run one decoder step, deliver its tokens, free the slots of the
        choices that ended. False when there was nothing to run."""
        with self.cond:
            self._admit()
            if not self.slots:
                return False
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(self.slots))
        try:
            emitted = self.decoder.step()
        except Exception as e:  # contained to the requests in the slots
            log.error("a decoding step failed: %s\n%s", e, traceback.format_exc())
            self.decoder.reset()
            with self.cond:
                failed = self.running
                self.slots.clear()
                self._gauges()
                self.cond.notify_all()
            for req in failed:
                self._fail(req, f"generation failed: {type(e).__name__}: {e}")
            return True
        now, count = time.monotonic(), 0
        for slot, token in emitted:
            req, c = self.slots[slot]
            if not c.finished:
                self._advance(req, c, int(token), now)
                count += 1
        if self.metrics is not None:
            self.metrics.add_tokens(count)
        with self.cond:
            for slot, (req, c) in list(self.slots.items()):
                if not c.finished and (req.cancelled or req.expired(now)):
                    self._finish(req, c, "cancelled", "")
                elif not c.finished and len(c.prompt) + len(c.ids) >= self.max_seq_len:
                    self._finish(req, c, "length", self._text(req, c.ids)[0][len(c.sent):])
                if c.finished:
                    self.decoder.release(slot)
                    del self.slots[slot]
            self._gauges()
            self.cond.notify_all()
        return True

    def _admit(self) -> None:
        """Drop the waiting requests that were cancelled or expired; move the oldest waiting
        ones into free slots while their choices fit (first come, first served)."""
        now = time.monotonic()
        for req in [r for r in self.queue if r.cancelled or r.expired(now)]:
            self.queue.remove(req)
            if not req.cancelled:
                req.put(Event("error", error=_timeout_error()))
        free = [s for s in range(self.max_batch) if s not in self.slots]
        while self.queue and len(self.queue[0].choices) <= len(free):
            req = self.queue.popleft()
            seed = req.seed if req.seed is not None else random.getrandbits(31)
            taken = []
            try:
                for c in req.choices:
                    slot = free.pop(0)
                    self.decoder.admit(slot, c.prompt, req.sampling, seed=seed, row=c.index)
                    taken.append(slot)
                    self.slots[slot] = (req, c)
            except Exception as e:  # this request only
                log.error("admitting a request failed: %s\n%s", e, traceback.format_exc())
                for slot in taken:
                    self.decoder.release(slot)
                    del self.slots[slot]
                free = sorted(free + taken)
                self._fail(req, f"generation failed: {type(e).__name__}: {e}")
                continue
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(req.prompt_tokens)
        self._gauges()

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        for c in req.choices:
            c.finished = c.finished or "error"
        req.put(Event("error", error=EngineError(500, message)))


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
