"""The OpenAI-compatible HTTP API (FastAPI) over the engine.

    POST /v1/chat/completions   ChatML through `make_context`'s rules (`tools.render` /
                                `make_prompt`); `tools` / legacy `functions` as the release's
                                ReAct prompt, replies parsed into `tool_calls` (streamed through
                                `tools.StreamParser`)
    POST /v1/completions        raw prompts (text encoded as `python -m qwen_jax.generate` does,
                                or token ids)
    GET  /v1/models             the one model served
    GET  /health                200 once the warm-up has compiled the model, 503 before
    GET  /metrics               Prometheus text (`metrics.py`)

Every error is OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: a malformed
body or field 400 (not FastAPI's 422), a prompt longer than the context 400, a wrong or missing
`Authorization: Bearer` (with an API key) 401, a full queue 429, not ready 503, a deadline 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_jax.data import chat_format
from qwen_jax.serve import tools
from qwen_jax.serve.engine import Engine, EngineError, Request as EngineRequest, Sampling
from qwen_jax.serve.metrics import Metrics
from qwen_jax.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    bad_request,
    error_body,
    validation_message,
)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Service:
    """What the routes need: the engine, the tokenizer, the generation defaults, the limits."""

    def __init__(self, engine: Engine, tokenizer, gen, *, model_name: str, max_seq_len: int,
                 api_key: str | None = None, request_timeout: float | None = None,
                 metrics: Metrics | None = None):
        self.engine, self.tokenizer, self.gen = engine, tokenizer, gen
        self.model_name, self.max_seq_len = model_name, max_seq_len
        self.api_key, self.request_timeout = api_key, request_timeout
        self.metrics = metrics or engine.metrics or Metrics()
        engine.metrics = self.metrics
        chatml = tuple(tuple(s) for s in chat_format.stop_words_ids(tokenizer, "chatml"))
        self.chat_stops = tuple(dict.fromkeys(tuple(gen.stop_sequences) + chatml))
        self.created = int(time.time())

    def warmup_requests(self) -> list[EngineRequest]:
        """A short chat prompt with the default max_tokens, stopping after 2 tokens, with the
        checkpoint's sampling and greedy: the prefill and decode programs of common requests
        are compiled before the server is ready (the decode step compiles per set of
        processors its rows use; a mix compiles when it first occurs)."""
        ids = chat_format.make_context(self.tokenizer, "Hello!")[1]
        need = min(self.gen.max_new_tokens, self.max_seq_len - len(ids))
        if need < 1:
            return []
        kinds = [ChatRequest(messages=[]).sampling(self.gen)]
        greedy = ChatRequest(messages=[], temperature=0).sampling(self.gen)
        kinds += [greedy] if greedy != kinds[0] else []
        return [EngineRequest([ids], sampling=s, max_tokens=need, stop_ids=self.chat_stops,
                              seed=0, limit=2) for s in kinds]

    def check_ready(self) -> None:
        if self.engine.failed:
            raise EngineError(503, f"the engine stopped: {self.engine.failed}")
        if self.engine.closing:
            raise EngineError(503, "the server is shutting down", code="shutting_down")
        if not self.engine.ready.is_set():
            raise EngineError(503, "the model is still loading; retry when GET /health "
                              "answers 200", code="not_ready")

    def submit(self, prompts: list[list[int]], body, asked: int | None, stop: list[str],
               stop_ids, param: str) -> EngineRequest:
        longest, context = max(map(len, prompts)), self.max_seq_len
        if longest >= context:
            raise bad_request(f"the prompt has {longest} tokens but the model's context is "
                              f"{context} tokens (--max-seq-len); shorten the prompt", param,
                              "context_length_exceeded")
        if asked is not None and longest + asked > context:
            raise bad_request(f"this model's maximum context length is {context} tokens, but "
                              f"{longest + asked} were requested ({longest} in the prompt, "
                              f"{asked} for the completion); reduce the prompt or max_tokens",
                              "max_tokens", "context_length_exceeded")
        rows, limit = len(prompts) * body.n, self.engine.max_batch
        if rows > limit:
            raise bad_request(f"{rows} choices (n={body.n} x {len(prompts)} prompts) are more "
                              f"than the server's --max-batch {limit}", "n")
        sampling = body.sampling(self.gen)
        req = EngineRequest(prompts, n=body.n, sampling=sampling,
                            max_tokens=asked or min(self.gen.max_new_tokens, context - longest),
                            stop=stop, stop_ids=stop_ids,  # greedy: a seed changes nothing
                            seed=body.seed_value() if sampling.do_sample else None,
                            timeout=self.request_timeout, loop=asyncio.get_running_loop())
        self.engine.submit(req)
        return req

    async def events(self, req: EngineRequest, request: Request | None):
        """The request's events up to "done"; raises its EngineError, a 504 at the deadline,
        ClientGone when `request` (polled: non-streaming only) disconnects."""
        while True:
            wait = 1.0
            if req.deadline is not None:
                left = req.deadline - time.monotonic()
                if left <= 0:
                    req.cancel()
                    raise EngineError(504, "the request ran past the server's "
                                      "--request-timeout", "timeout_error", "request_timeout")
                wait = min(wait, left)
            try:
                ev = await asyncio.wait_for(req.events.get(), wait)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    req.cancel()
                    raise ClientGone from None
                continue
            if ev.kind == "error":
                raise ev.error
            yield ev
            if ev.kind == "done":
                return

    async def collect(self, req: EngineRequest, request: Request):
        """(texts, finish reasons, completion tokens) of every choice."""
        texts = [""] * len(req.choices)
        reasons: list = [None] * len(req.choices)
        async for ev in self.events(req, request):
            if ev.kind in ("delta", "finish"):
                texts[ev.index] += ev.text
            if ev.kind == "finish":
                reasons[ev.index] = ev.finish_reason
        return texts, reasons

    def usage(self, req: EngineRequest) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
                "total_tokens": req.prompt_tokens + req.completion_tokens}


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _error_response(e: EngineError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)



async def _collect(service, req, request):
    """(texts, finish reasons) of a whole request, or a 499 response when the client left;
    the request is cancelled either way once it is over."""
    try:
        return await service.collect(req, request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        req.cancel()

def _call_delta(call: dict, legacy: bool) -> dict:
    if legacy:
        return {"function_call": call["function"]}
    return {"tool_calls": [{"index": 0, **call}]}


class _Guard:
    """ASGI middleware: the API key on /v1/ routes, and the request counter by status."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        key = service.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, self.expected):
                    what = "no API key was given" if not given else "incorrect API key"
                    body = error_body(f"{what}: send 'Authorization: Bearer <the server's "
                                      "--api-key>'", code="invalid_api_key")
                    return await JSONResponse(body, 401)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.service.metrics.count_request(scope["path"], status[0])


def create_app(service: Service) -> FastAPI:
    engine = service.engine

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.thread.is_alive() and not engine.stopped:
            engine.start()
        yield
        # uvicorn has waited (--shutdown-grace) for the requests in flight; cancel the rest.
        await asyncio.to_thread(engine.close, 0.0)

    app = FastAPI(title="qwen_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(_Guard, service=service)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(EngineError)
    async def _engine_error(request, exc: EngineError):
        return _error_response(exc)

    @app.exception_handler(tools.ToolError)
    async def _tool_error(request, exc: tools.ToolError):
        return JSONResponse(error_body(str(exc), param="messages"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        try:
            service.check_ready()
        except EngineError as e:
            return JSONResponse({"status": e.code or "failed", "message": e.message}, 503)
        return {"status": "ok", "model": service.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created,
                                            "owned_by": "qwen_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_ready()
        body.check_supported()
        fns = (tools.normalize_tools(body.tools, body.functions) if body.uses_tools() else [])
        legacy = bool(body.functions) and not body.tools
        query, history, system = tools.render(body.messages, fns)
        _, ids = tools.make_prompt(service.tokenizer, query, history, system,
                                   service.gen.max_window_size)
        stop = body.stops() + ([tools.STOP_WORD] if fns else [])
        req = service.submit([ids], body, body.requested_tokens(), stop, service.chat_stops,
                             "messages")
        head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()),
                "model": service.model_name}
        if body.stream:
            return StreamingResponse(_chat_stream(service, req, head, fns, legacy,
                                                  body.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collected = await _collect(service, req, request)
        if isinstance(collected, Response):
            return collected
        texts, reasons = collected
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            result = tools.parse(text, fns)
            message = {"role": "assistant", "content": result["content"]}
            if result["tool_calls"]:
                reason = "function_call" if legacy else "tool_calls"
                message.update(_call_delta(result["tool_calls"][0], legacy) if legacy
                               else {"tool_calls": result["tool_calls"]})
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": reason})
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": service.usage(req)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_ready()
        body.check_supported()
        prompts = body.prompts(service.tokenizer)
        echo = [t for t in body.echo_texts(service.tokenizer, prompts) for _ in range(body.n)]
        req = service.submit(prompts, body, body.max_tokens, body.stops(),
                             service.gen.stop_sequences, "prompt")
        head = {"id": "cmpl-" + secrets.token_hex(12), "created": int(time.time()),
                "model": service.model_name}
        if body.stream:
            return StreamingResponse(_completion_stream(service, req, head, echo,
                                                        body.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collected = await _collect(service, req, request)
        if isinstance(collected, Response):
            return collected
        texts, reasons = collected
        return {**head, "object": "text_completion", "usage": service.usage(req),
                "choices": [{"index": i, "text": echo[i] + t, "logprobs": None,
                             "finish_reason": r}
                            for i, (t, r) in enumerate(zip(texts, reasons))]}

    return app


async def _chat_stream(service: Service, req: EngineRequest, head: dict, fns: list,
                       legacy: bool, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    parsers = [tools.StreamParser(fns) for _ in req.choices]

    def chunk(index, delta, finish=None):
        return _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}], **extra})

    try:
        for i in range(len(req.choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        try:
            async for ev in service.events(req, None):
                if ev.kind not in ("delta", "finish"):
                    continue
                parser = parsers[ev.index]
                content = parser.feed(ev.text)
                if ev.kind == "delta":
                    if content:
                        yield chunk(ev.index, {"content": content})
                    continue
                rest, result = parser.finish()
                if content + rest:
                    yield chunk(ev.index, {"content": content + rest})
                reason = ev.finish_reason
                if result["tool_calls"]:
                    reason = "function_call" if legacy else "tool_calls"
                    yield chunk(ev.index, _call_delta(result["tool_calls"][0], legacy))
                yield chunk(ev.index, {}, reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": service.usage(req)})
        except EngineError as e:
            yield _sse(error_body(e.message, e.type, e.param, e.code))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): stop decoding for it
        req.cancel()


async def _completion_stream(service: Service, req: EngineRequest, head: dict,
                             echo: list[str], include_usage: bool):
    head = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index, text, finish=None):
        return _sse({**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                          "finish_reason": finish}], **extra})

    try:
        for i, text in enumerate(echo):
            if text:
                yield chunk(i, text)
        try:
            async for ev in service.events(req, None):
                if ev.kind == "delta":
                    yield chunk(ev.index, ev.text)
                elif ev.kind == "finish":
                    yield chunk(ev.index, ev.text, ev.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": service.usage(req)})
        except EngineError as e:
            yield _sse(error_body(e.message, e.type, e.param, e.code))
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()


__all__ = ["ClientGone", "Sampling", "Service", "create_app"]
