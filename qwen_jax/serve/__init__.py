"""Serving a model over an OpenAI-compatible API (report §3.4): `python -m qwen_jax.serve`.

- `__main__.py`: the command line (load, warm up, uvicorn, a clean exit on SIGTERM);
- `app.py`: the FastAPI routes, OpenAI's error shape, server-sent events, the API key;
- `engine.py`: the thread that owns the model, the bounded queue and the batching of waiting
  requests through `generate`;
- `protocol.py`: request bodies and sampling defaults; `metrics.py`: Prometheus metrics;
- `tools.py`: function calling: OpenAI `tools` / legacy `functions` rendered as the original
  release's ReAct prompt, and generated replies parsed back into `tool_calls` (whole or
  streamed).
"""
