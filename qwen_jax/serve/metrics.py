"""The server's Prometheus metrics, in a registry of their own (one per app, so that tests can
build several apps in one process). `GET /metrics` serves `Metrics.render()`.

    qwen_jax_queue_depth                   requests waiting for the engine
    qwen_jax_running_requests              requests in the batch being decoded
    qwen_jax_batch_rows                    rows (choices) of that batch, padding rows left out
    qwen_jax_batch_size                    histogram: rows of each batch run
    qwen_jax_generated_tokens_total        tokens generated for requests (all choices)
    qwen_jax_prompt_tokens_total           prompt tokens of the requests decoded
    qwen_jax_tokens_per_second             tokens / s over the last second of decoding (0 when idle)
    qwen_jax_time_to_first_token_seconds   histogram: arrival to first generated token
    qwen_jax_request_duration_seconds      histogram: arrival to the last token (or the end)
    qwen_jax_requests_total{endpoint,status}  HTTP requests answered, by route and status code
"""

from __future__ import annotations

import threading
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("qwen_jax_queue_depth", "requests waiting for the engine",
                                 registry=r)
        self.running = Gauge("qwen_jax_running_requests", "requests being decoded", registry=r)
        self.batch_rows = Gauge("qwen_jax_batch_rows", "slots (rows) in use in the decode batch",
                                registry=r)
        self.batch_size = Histogram("qwen_jax_batch_size", "slots in use at each engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.generated = Counter("qwen_jax_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("qwen_jax_prompt_tokens", "prompt tokens decoded",
                                     registry=r)
        self.tokens_per_second = Gauge("qwen_jax_tokens_per_second",
                                       "generated tokens per second (last second of decoding)",
                                       registry=r)
        self.ttft = Histogram("qwen_jax_time_to_first_token_seconds",
                              "arrival to the first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.duration = Histogram("qwen_jax_request_duration_seconds",
                                  "arrival to the end of generation",
                                  buckets=_LATENCY_BUCKETS + (120.0, 300.0), registry=r)
        self.requests = Counter("qwen_jax_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._window_tokens = 0

    def add_tokens(self, n: int) -> None:
        """Count `n` generated tokens; the tokens/s gauge is refreshed about once a second."""
        if n <= 0:
            return
        self.generated.inc(n)
        with self._lock:
            self._window_tokens += n
            now = time.monotonic()
            if now - self._window_start >= 1.0:
                self.tokens_per_second.set(self._window_tokens / (now - self._window_start))
                self._window_start, self._window_tokens = now, 0

    def idle(self) -> None:
        """No batch is running: the rate of the last window, 0 from the next call on."""
        with self._lock:
            now = time.monotonic()
            if self._window_tokens and now > self._window_start:
                self.tokens_per_second.set(self._window_tokens / (now - self._window_start))
            else:
                self.tokens_per_second.set(0)
            self._window_start, self._window_tokens = now, 0

    def count_request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
