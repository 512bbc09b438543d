"""Serving a model over an OpenAI-compatible API (report §3.4).

`tools.py` holds the pure functions of function calling: OpenAI `tools` / legacy `functions`
rendered as the original release's ReAct prompt, and generated replies parsed back into
`tool_calls` (whole or streamed).
"""
