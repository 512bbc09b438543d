"""The OpenAI request bodies the server accepts (pydantic) and its error shape.

Fields OpenAI defines and the server cannot honour are refused with a 400 (logprobs, suffix,
best_of, nonzero presence/frequency penalties, a forced tool_choice) rather than ignored;
unknown fields are ignored, as OpenAI's own server does with fields of newer clients. Extra
fields the server understands (the OpenAI client's `extra_body`): `top_k` and
`repetition_penalty`.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qwen_jax.serve.engine import EngineError, Sampling

MAX_STOP = 4
GREEDY_BELOW = 0.01  # temperature under this = greedy (the release's openai_api.py)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None):
    return EngineError(400, message, "invalid_request_error", code, param)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors for a 400, the first error first."""
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON: "
                         + str(e.get("ctx", {}).get("error", e.get("msg", ""))))
            continue
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", ""))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported; use the extra field "
                                  "repetition_penalty (transformers' semantics)", name)

    def sampling(self, gen) -> Sampling:
        """The request's sampling over the checkpoint's generation config (greedy: the
        fields that only sampling reads are normalised, so greedy requests share batches)."""
        do_sample, temperature = gen.do_sample, float(gen.temperature)
        if self.temperature is not None:
            do_sample = self.temperature >= GREEDY_BELOW
            temperature = self.temperature if do_sample else 1.0
        top_p = gen.top_p if self.top_p is None else self.top_p
        top_k = gen.top_k if self.top_k is None else self.top_k
        penalty = (gen.repetition_penalty if self.repetition_penalty is None
                   else self.repetition_penalty)
        if not do_sample:
            temperature, top_p, top_k = 1.0, 1.0, 0
        return Sampling(bool(do_sample), float(temperature), int(top_k), float(top_p),
                        float(penalty))

    def seed_value(self) -> int | None:
        return None if self.seed is None else self.seed % (2 ** 31)


class ChatRequest(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Union[str, dict, None] = None
    function_call: Union[str, dict, None] = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported by this server", "logprobs")
        for name in ("tool_choice", "function_call"):
            choice = getattr(self, name)
            if choice not in (None, "auto", "none"):
                raise bad_request(f"{name}={choice!r} is not supported: the model chooses "
                                  "itself ('auto') or gets no tools ('none')", name)

    def uses_tools(self) -> bool:
        return "none" not in (self.tool_choice, self.function_call)

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise bad_request("logprobs are not supported by this server", "logprobs")
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported (it may only equal n)", "best_of")

    def prompts(self, tokenizer) -> list[list[int]]:
        """Token ids of each prompt (an empty prompt starts from <|endoftext|>, as OpenAI's
        models do)."""
        p = self.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        if not items:
            raise bad_request("'prompt' is an empty list", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = tokenizer.encode(item)  # as python -m qwen_jax.generate does
            else:
                ids = [int(i) for i in item]
                bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
                if bad:
                    raise bad_request(f"token id {bad[0]} in 'prompt' is outside the "
                                      f"vocabulary [0, {tokenizer.vocab_size})", "prompt")
            out.append(ids or [tokenizer.eod_id])
        return out

    def echo_texts(self, tokenizer, prompts: list[list[int]]) -> list[str]:
        """What `echo` puts before each prompt's choices: the prompt text ("" without echo)."""
        if not self.echo:
            return [""] * len(prompts)
        p = self.prompt
        texts = [p] if isinstance(p, str) else p if isinstance(p[0], str) else [None] * len(prompts)
        return [t if t is not None else tokenizer.decode(ids) for t, ids in zip(texts, prompts)]
