"""python -m qwen_jax.serve end to end: the real server in a subprocess on tiny checkpoints,
talked to with the real `openai` client (and httpx for the raw HTTP), plus the tool-calling
path in-process against a stub decoder that writes a fixed ReAct reply.

Server A: a random byte-tokenizer model (its lm_head favours printable ASCII, so texts are
visible and greedy choices are clear-cut) with a chat generation_config.json; --api-key,
--max-batch 4, --max-seq-len 1024 (the ReAct prompt of one tool is ~870 bytes). Server B: a
random model with the real Qwen vocabulary, --max-queue 1, for the 429 and SIGTERM checks.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from qwen_jax.cli import load_model
from qwen_jax.data import chat_format
from qwen_jax.data.tokenizer import ByteTokenizer
from qwen_jax.infer import generate as generate_cli
from qwen_jax.infer.generate import generate
from qwen_jax.infer.sampling import GenerationConfig, load_generation_config
from qwen_jax.io.checkpoint import save_checkpoint
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import init_params
from qwen_jax.serve.app import Service, create_app
from qwen_jax.serve.engine import Engine, EngineError, QueueFull, Request, Sampling
import docs_commands
import runs
from scaled_weights import scaled_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "sk-serve-test"
GEN_CONFIG = {"chat_format": "chatml", "do_sample": True, "eos_token_id": 151643,
              "max_new_tokens": 24, "max_window_size": 6144, "pad_token_id": 151643,
              "repetition_penalty": 1.1, "top_k": 0, "top_p": 0.8}
SYSTEM = "You are a helpful assistant."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


class Server:
    """`python -m qwen_jax.serve` in a subprocess on 127.0.0.1, its log in a file."""

    def __init__(self, checkpoint, log_path, *args):
        self.port = runs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_path)
        env = {k: v for k, v in os.environ.items() if k != "QWEN_TIKTOKEN"}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qwen_jax.serve", "--checkpoint", str(checkpoint),
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                 *map(str, args)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, timeout=240.0) -> None:
        end, last = time.monotonic() + timeout, None
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the server exited early:\n{self.log()}"
            try:
                last = httpx.get(self.url + "/health", timeout=5)
                if last.status_code == 200:
                    return
                assert last.status_code == 503 and last.json()["status"] == "not_ready"
            except httpx.TransportError:  # not listening yet (the model is loading)
                pass
            time.sleep(0.25)
        raise AssertionError(f"no 200 from /health in {timeout} s ({last}):\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _printable_model(config, seed=0):
    """O(1)-scale random weights whose lm_head writes printable ASCII (other ids get logit 0,
    the printable ones logits of std ~4)."""
    params = scaled_params(config, seed)
    head = np.array(params["lm_head"]["kernel"])
    keep = np.zeros(config.vocab_size, bool)
    keep[32:127] = True
    head[:, ~keep] = 0.0
    head[:, keep] *= 4.0
    params["lm_head"]["kernel"] = head
    return params


@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory):
    config = QwenConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                        intermediate_size=128, kv_channels=16, seq_length=256, vocab_size=512,
                        dtype="float32", param_dtype="float32")
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat",
                           jax.device_get(_printable_model(config)), config,
                           extra_files={"generation_config.json": json.dumps(GEN_CONFIG)})


@pytest.fixture(scope="module")
def server_a(ckpt_a, tmp_path_factory):
    server = Server(ckpt_a, tmp_path_factory.mktemp("logs") / "a.log", "--max-batch", 4,
                    "--api-key", KEY, "--request-timeout", 120, "--max-seq-len", 1024)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_b(tmp_path_factory, qwen_tiktoken_path):
    config = QwenConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=64, kv_channels=16, seq_length=128, vocab_size=151936,
                        dtype="float32", param_dtype="float32")
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    ckpt = save_checkpoint(tmp_path_factory.mktemp("serve") / "qwen-vocab", params, config,
                           tokenizer_file=qwen_tiktoken_path)
    server = Server(ckpt, tmp_path_factory.mktemp("logs") / "b.log", "--max-batch", 1,
                    "--max-queue", 1, "--shutdown-grace", 20)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server_a):
    return openai.OpenAI(base_url=server_a.url + "/v1", api_key=KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model_a(ckpt_a):
    """(params, config, tokenizer, generation config) loaded as the server loads them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("QWEN_TIKTOKEN", raising=False)
        params, config, tok = load_model(argparse.Namespace(checkpoint=str(ckpt_a),
                                                            dtype=None))
    assert isinstance(tok, ByteTokenizer)
    return params, config, tok, load_generation_config(ckpt_a, tok)


def _metric(server, sample: str) -> float:
    """The value of one sample line of GET /metrics (0 when absent)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _multirow_batches(server) -> float:
    return (_metric(server, "qwen_jax_batch_size_count")
            - _metric(server, 'qwen_jax_batch_size_bucket{le="1.0"}'))


def _chat(client, text, **kw):
    return client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": text}], **kw)


def test_health_models_and_metrics(server_a, client):
    assert httpx.get(server_a.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    _chat(client, "warm", max_tokens=2, temperature=0)
    text = httpx.get(server_a.url + "/metrics").text
    for name in ("qwen_jax_queue_depth", "qwen_jax_running_requests",
                 "qwen_jax_generated_tokens_total", "qwen_jax_tokens_per_second",
                 "qwen_jax_time_to_first_token_seconds_bucket", "qwen_jax_requests_total{"):
        assert name in text, name
    assert 'endpoint="/v1/chat/completions",status="200"' in text


def test_the_documented_curl_request(server_a):
    """docs/serving.md's curl command as written (its URL on this server's port, its KEY this
    server's key): its headers and JSON body get a chat completion."""
    command = docs_commands.find("curl", "/v1/chat/completions")
    args = command.args
    url = args[0].replace("http://127.0.0.1:8000", server_a.url)
    assert url != args[0], command.text
    headers = dict(args[i + 1].replace("KEY", KEY).split(": ", 1)
                   for i, a in enumerate(args) if a == "-H")
    body = args[args.index("-d") + 1]
    reply = httpx.post(url, headers=headers, content=body, timeout=120)
    assert reply.status_code == 200, reply.text
    completion = reply.json()
    assert completion["object"] == "chat.completion"
    assert completion["usage"]["completion_tokens"] <= json.loads(body)["max_tokens"]
    assert completion["choices"][0]["message"]["role"] == "assistant"


def test_chat_greedy_equals_generate(client, model_a):
    params, config, tok, gen = model_a
    r = _chat(client, "What is 2+2?", temperature=0, max_tokens=12)
    ids = chat_format.make_context(tok, "What is 2+2?", [], SYSTEM)[1]
    stops = gen.stop_sequences + tuple(tuple(s) for s in chat_format.stop_words_ids(tok))
    # The checkpoint's defaults (repetition_penalty 1.1) apply; temperature 0 = greedy.
    g = gen.replace(do_sample=False, max_new_tokens=12, vocab_limit=tok.vocab_size,
                    stop_sequences=stops)
    want = generate(params, config, [ids], g)
    assert r.choices[0].message.content == tok.decode(want.completion(0),
                                                      skip_special_tokens=True)
    plain = generate(params, config, [ids], g.replace(repetition_penalty=1.0))
    assert plain.completion(0) != want.completion(0)  # so the penalty was applied
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    assert r.usage.total_tokens == len(ids) + 12


def test_completion_greedy_equals_the_generate_cli(client, ckpt_a, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nThe capital of France is\n")
    assert generate_cli.main(["--checkpoint", str(ckpt_a), "--prompts-file", str(prompts),
                              "--greedy", "--max-new-tokens", "10"]) == 0
    want = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    r = client.completions.create(model="tiny-chat", prompt=["def main(",
                                                             "The capital of France is"],
                                  temperature=0, max_tokens=10)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == 9 + 24


def test_streaming_concatenates_to_the_answer(server_a, client):
    whole = _chat(client, "Stream me", temperature=0, max_tokens=16)
    chunks = list(_chat(client, "Stream me", temperature=0, max_tokens=16, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # The raw stream: server-sent events ending with [DONE].
    with httpx.stream("POST", server_a.url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "abc", "max_tokens": 6, "temperature": 0,
                            "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    plain = httpx.post(server_a.url + "/v1/completions", headers={
        "Authorization": f"Bearer {KEY}"}, json={"prompt": "abc", "max_tokens": 6,
                                                 "temperature": 0}, timeout=60).json()
    assert "".join(texts) == plain["choices"][0]["text"]


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(temperature=1.0, top_p=1.0, max_tokens=10, n=2)
    a, b = _chat(client, "Roll dice", seed=11, **kw), _chat(client, "Roll dice", seed=11, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # rows draw apart
    c = _chat(client, "Roll dice", seed=12, **kw)
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]
    assert a.usage.completion_tokens == 20
    greedy = client.completions.create(model="m", prompt="x", n=3, temperature=0,
                                       max_tokens=5, extra_body={"top_k": 5})
    assert len({ch.text for ch in greedy.choices}) == 1 and len(greedy.choices) == 3


def test_stop_strings_cut_the_text(client):
    full = _chat(client, "Tell me more", temperature=0, max_tokens=20).choices[0].message.content
    stop = full[6:8]
    cut = full[:full.find(stop)]
    r = _chat(client, "Tell me more", temperature=0, max_tokens=20,
              stop=[stop, "~~never~~"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = _chat(client, "Tell me more", temperature=0, max_tokens=20, stop=stop,
                     stream=True)
    parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in streamed]
    assert "".join(p for p, _ in parts) == cut and parts[-1][1] == "stop"


def test_max_tokens_and_usage(client, model_a):
    tok = model_a[2]
    r = _chat(client, "Count", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(chat_format.make_context(tok, "Count", [], SYSTEM)[1])
    r = client.completions.create(model="m", prompt="ab", max_tokens=3, temperature=0)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 3, 5)
    r = client.completions.create(model="m", prompt="ab")  # generation_config.json's 24
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"


def test_api_key(server_a):
    bad = openai.OpenAI(base_url=server_a.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    r = httpx.post(server_a.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server_a.url + "/health").status_code == 200  # no key needed there


def test_bad_requests_are_400(server_a, client, model_a):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server_a.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    user = [{"role": "user", "content": "hi"}]
    for body, words in [({"messages": user, "temperature": "hot"}, "temperature"),
                        ({"messages": user, "n": 0}, "n"),
                        ({"messages": user, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
                        ({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
                        ({"messages": user, "n": 9}, "--max-batch 4"),
                        ([1, 2], "object")]:
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone is over the context
        _chat(client, "x" * 1100, max_tokens=4)
    message = e.value.body["message"]
    n = len(chat_format.make_context(model_a[2], "x" * 1100, [], SYSTEM)[1])
    assert f"has {n} tokens" in message and "context is 1024 tokens" in message, message
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.completions.create(model="m", prompt="y" * 900, max_tokens=200)
    assert all(str(n) in e.value.body["message"] for n in (1024, 900, 200, 1100))
    # The server is fine afterwards.
    assert _chat(client, "ok?", max_tokens=2, temperature=0).choices[0].finish_reason


def test_tools_on_the_real_server(client):
    r = _chat(client, "What is the weather in Paris?", tools=[WEATHER], max_tokens=16)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls


def test_concurrent_requests_match_alone(server_a, client):
    """16 requests at once on 4 slots (continuous batching: each joins when a slot frees):
    greedy ones of different lengths and seeded sampled ones, each equal to itself alone."""
    asks = [(f"Question number {i}?", dict(temperature=0, max_tokens=6 + i % 4 * 3))
            for i in range(12)]
    asks += [(f"Sample {i}", dict(temperature=0.8, top_p=0.9, seed=i, max_tokens=10))
             for i in range(4)]

    def run(ask):
        return _chat(client, ask[0], **ask[1]).choices[0].message.content

    alone = [run(a) for a in asks]
    batched = _multirow_batches(server_a)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, asks))
    assert together == alone
    assert _multirow_batches(server_a) > batched  # they did share decode steps


def test_client_disconnect_mid_stream(server_a, client):
    before = _chat(client, "After", temperature=0, max_tokens=8).choices[0].message.content
    tokens = _metric(server_a, "qwen_jax_generated_tokens_total")
    with httpx.stream("POST", server_a.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "long"}],
                            "max_tokens": 200, "temperature": 0, "stream": True}) as resp:
        first = next(line for line in resp.iter_lines() if line)
        assert first.startswith("data: ")
    # The connection is gone; the server goes on serving, with the same answers.
    assert _chat(client, "After", temperature=0, max_tokens=8).choices[0].message.content == (
        before)
    assert httpx.get(server_a.url + "/health").status_code == 200
    # The abandoned request was cancelled, not decoded to its 200 tokens.
    assert _metric(server_a, "qwen_jax_generated_tokens_total") - tokens < 8 + 100


def test_queue_full_is_429_then_sigterm_exits_0(server_b):
    client = openai.OpenAI(base_url=server_b.url + "/v1", api_key="none", max_retries=0,
                           timeout=120)

    def ask(temperature):  # 1 slot, 1 place in the queue: some of the 5 are refused
        try:
            r = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "你好"}], max_tokens=16,
                temperature=temperature)
            return r.choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "queue_full"
            return 429

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(ask, [0.3, 0.4, 0.5, 0.6, 0.7]))
    assert 429 in outcomes and any(o in ("stop", "length") for o in outcomes), outcomes
    # SIGTERM with a stream in flight: it finishes, then the process exits with status 0.
    with httpx.stream("POST", server_b.url + "/v1/chat/completions", timeout=120,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                            "temperature": 0.9, "stream": True}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        server_b.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert server_b.proc.wait(timeout=60) == 0, server_b.log()


# ------------------------------------------------------------- in-process, a stub decoder
class Scripted:
    """A stand-in decoder with 4 slots: every slot writes `reply` (then <|endoftext|>), one
    token per step; it records the prompts it was given."""

    num_slots = 4

    def __init__(self, tok, reply: str, delay: float = 0.0, fail_on: str | None = None):
        self.tok, self.ids, self.delay, self.fail_on = tok, tok.encode(reply), delay, fail_on
        self.prompts: list[str] = []
        self.pos: dict[int, int] = {}  # slot -> tokens written

    def admit(self, slot, prompt, params, *, seed, row=0):
        assert slot not in self.pos and 0 <= slot < self.num_slots
        self.prompts.append(self.tok.decode(prompt))
        if self.fail_on and self.fail_on in self.prompts[-1]:
            raise RuntimeError("scripted failure")
        self.pos[slot] = 0

    def step(self):
        time.sleep(self.delay)
        seq, out = self.ids + [self.tok.eod_id], []
        for slot in sorted(self.pos):
            out.append((slot, seq[min(self.pos[slot], len(seq) - 1)]))
            self.pos[slot] += 1
        return out

    def release(self, slot):
        del self.pos[slot]

    def reset(self):
        self.pos.clear()


def _stub_app(reply, **kw):
    tok = ByteTokenizer()
    gen = GenerationConfig(stop_sequences=((tok.eod_id,),), pad_token_id=tok.eod_id,
                           max_new_tokens=200, vocab_limit=tok.vocab_size)
    decoder = Scripted(tok, reply, kw.pop("delay", 0.0), kw.pop("fail_on", None))
    engine = Engine(decoder, tok, max_queue=8, max_seq_len=2048)
    service = Service(engine, tok, gen, model_name="stub", max_seq_len=2048, **kw)
    return create_app(service), decoder


CALL = ('Thought: I should ask the weather API.\nAction: get_weather\n'
        'Action Input: {"city": "Paris"}\nObservation: sunny, 21 C')


def test_tool_calls_http_shape():
    app, decoder = _stub_app(CALL)
    ask = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=ask)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "I should ask the weather API."
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        # The prompt was the release's ReAct instruction with the tool in it.
        assert "get_weather: Call this tool" in decoder.prompts[-1]
        assert "Question: Weather in Paris?" in decoder.prompts[-1]
        # Streamed: the call comes as a tool_calls delta, then finish_reason "tool_calls".
        with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert calls and calls[0][0]["function"]["name"] == "get_weather"
        assert calls[0][0]["index"] == 0
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        # Legacy `functions`: function_call and finish_reason "function_call".
        legacy = {"messages": ask["messages"], "functions": [WEATHER["function"]]}
        choice = http.post("/v1/chat/completions", json=legacy).json()["choices"][0]
        assert choice["finish_reason"] == "function_call"
        assert choice["message"]["function_call"]["name"] == "get_weather"
        # A result sent back continues the same assistant turn after "Observation:".
        follow = {"tools": [WEATHER], "messages": ask["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
        assert http.post("/v1/chat/completions", json=follow).status_code == 200
        assert decoder.prompts[-1].endswith("Observation: sunny\nThought:")


def test_final_answer_and_failures_with_the_stub():
    app, _ = _stub_app("Thought: I know.\nFinal Answer: It is sunny.", fail_on="BOOM",
                       request_timeout=30)
    ask = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]}
    with TestClient(app) as http:
        choice = http.post("/v1/chat/completions", json=ask).json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
        assert choice["finish_reason"] == "stop"
        with http.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x and x != "data: [DONE]"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
            "It is sunny.")
        # A batch that fails answers 500 for its requests; the next request is served.
        r = http.post("/v1/completions", json={"prompt": "BOOM"})
        assert r.status_code == 500 and "scripted failure" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Thoug"
    slow, _ = _stub_app("z" * 50, delay=0.05, request_timeout=0.5)
    with TestClient(slow) as http:  # --request-timeout: a 504 in OpenAI's shape
        r = http.post("/v1/completions", json={"prompt": "slow"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"


def test_engine_admits_first_come_first_served_into_free_slots():
    tok = ByteTokenizer()
    decoder = Scripted(tok, "abc")
    engine = Engine(decoder, tok, max_queue=8, max_seq_len=100)

    def req(n=1, **kw):
        return Request([[65] * 10], n=n, max_tokens=10, **kw)

    reqs = [req(), req(2, sampling=Sampling(do_sample=True, top_p=0.9), seed=3), req(2), req()]
    for r in reqs:
        engine.submit(r)
    with engine.cond:
        engine._admit()
    # 4 slots: the first two requests (3 choices) join; the third needs 2 slots and waits,
    # and the fourth waits behind it (first come, first served).
    assert {s: (reqs.index(r), c.index) for s, (r, c) in engine.slots.items()} == {
        0: (0, 0), 1: (1, 0), 2: (1, 1)}
    assert list(engine.queue) == reqs[2:]
    reqs[0].cancel()  # its slot is freed by the next step, and the waiting ones move in
    assert engine._iterate()
    with engine.cond:
        engine._admit()
    assert {s: (reqs.index(r), c.index) for s, (r, c) in engine.slots.items()} == {
        0: (2, 0), 1: (1, 0), 2: (1, 1), 3: (2, 1)}
    assert list(engine.queue) == reqs[3:]
    with pytest.raises(EngineError) as e:  # more choices than slots can never run
        engine.submit(req(5))
    assert e.value.status == 400 and "--max-batch 4" in e.value.message
    for _ in range(7):  # --max-queue 8
        engine.submit(req())
    with pytest.raises(QueueFull):
        engine.submit(req())
