"""ChatML prompts and SFT loss masks (report §3.1.2, appendix A.1.1).

`make_context` reproduces the original `qwen_generation_utils.make_context` token for token:
role words and message content are encoded with special-token text kept as plain bytes (a user
cannot inject `<|im_start|>`), only the structural `<|im_start|>`/`<|im_end|>` are special ids,
and history is kept newest-first while it fits `max_window_size`.

`encode_conversation` lays out a whole conversation the same way for supervised finetuning.
Loss mask convention (1 = token t is a training target, i.e. the loss on predicting it from the
tokens before it counts; the pipeline trains on `mask[1:]` against `ids[1:]`, so `mask[0]` never
counts). `loss_mask` picks one of two masks:

"assistant" (default; report §3.1.2):
  - system and user turns, including their `<|im_start|>`, role word, `\\n` and `<|im_end|>`: 0;
  - an assistant turn's header `<|im_start|>assistant\\n`: 0 (it is prompt: the serving code
    writes it, the model never has to produce it);
  - the assistant's reply tokens and its closing `<|im_end|>`: 1 (the model must learn to stop);
  - the `\\n` separator between turns: 0 (generation stops at `<|im_end|>`, so it is never sampled).

"release": the labels of the original release's `finetune.py` (`preprocess`), token for token:
mask[t] = 1 exactly where its label is not IGNORE_TOKEN_ID (its labels are aligned to the input
ids and shifted inside the model, as our mask is). Every message, the system block included, is
`<|im_start|>{role}\\n{content}<|im_end|>\\n` (so the ids end with that `\\n`, which the
"assistant" layout does not have), masked
  - `<|im_start|>`: 1; the role word and its `\\n`: 0;
  - the content: 1 in assistant turns, 0 in system and user turns;
  - `<|im_end|>` and the `\\n` after it: 1.
As in the release, the system block is always `default_system`, and a conversation whose first
message is an assistant turn loses that message. The release has no system turns in its data
(its role table holds only user and assistant, so a "system" turn stops it with a KeyError);
here a system message is likewise refused (ValueError) rather than silently replaced.
One difference is kept on purpose: message text stays plain text (`allow_special=False`, as in
`make_context`), where the release's tokenizer call turns special-token text in a message into
control ids; for text without such strings the ids are the release's too.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
LOSS_MASKS = ("assistant", "release")  # see the module doc


def _role_and_content(tokenizer, role: str, content: str) -> tuple[str, list[int]]:
    """`{role}\\n{content}` with role and content as plain text, exactly like the original."""
    nl = tokenizer.encode("\n")
    return (f"{role}\n{content}",
            tokenizer.encode(role, allow_special=False) + nl
            + tokenizer.encode(content, allow_special=False))


def make_context(tokenizer, query: str, history: Sequence[Sequence[str]] | None = None,
                 system: str = DEFAULT_SYSTEM, max_window_size: int = 6144,
                 chat_format: str = "chatml") -> tuple[str, list[int]]:
    """(raw_text, context_tokens) exactly as the original Qwen `make_context`."""
    history = list(history or [])
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat_format {chat_format!r}; expected 'chatml' or 'raw'")
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    start_ids, end_ids = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")

    system_text, system_part = _role_and_content(tokenizer, "system", system)
    system_tokens = start_ids + system_part + end_ids
    raw_text, context_tokens = "", []
    for turn_query, turn_response in reversed(history):
        query_text, query_part = _role_and_content(tokenizer, "user", turn_query)
        response_text, response_part = _role_and_content(tokenizer, "assistant", turn_response)
        turn_tokens = (nl + start_ids + query_part + end_ids
                       + nl + start_ids + response_part + end_ids)
        # The original keeps a turn only while the total stays strictly below the window and
        # stops at the first (newest-first) turn that does not fit.
        if len(system_tokens) + len(turn_tokens) + len(context_tokens) < max_window_size:
            context_tokens = turn_tokens + context_tokens
            raw_text = (f"\n{im_start}{query_text}{im_end}\n{im_start}{response_text}{im_end}"
                        + raw_text)
        else:
            break
    context_tokens = (system_tokens + context_tokens + nl + start_ids
                      + _role_and_content(tokenizer, "user", query)[1] + end_ids
                      + nl + start_ids + tokenizer.encode("assistant") + nl)
    raw_text = (f"{im_start}{system_text}{im_end}" + raw_text
                + f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n")
    return raw_text, context_tokens


class EncodedConversation(NamedTuple):
    ids: np.ndarray        # int32 [n]
    loss_mask: np.ndarray  # int32 [n], 1 where token t is a training target
    truncated: bool        # True when cut to max_len


def encode_conversation(tokenizer, messages: Sequence[dict], max_len: int | None = None,
                        default_system: str = DEFAULT_SYSTEM,
                        loss_mask: str = "assistant") -> EncodedConversation:
    """ChatML ids and loss mask for [{"role", "content"}, ...] (layouts and masks: module doc).

    "assistant": the layout equals `make_context`'s (`<|im_start|>system\\n..<|im_end|>` then
    `\\n<|im_start|>{role}\\n{content}<|im_end|>` per message). A system message may only come
    first; `default_system` is prepended when there is none. "release": the original
    `finetune.py`'s layout and labels (no system message allowed). Raises ValueError on an
    unknown role or loss_mask, or a malformed message.
    """
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"unknown loss_mask {loss_mask!r}; expected 'assistant' or 'release'")
    release = loss_mask == "release"
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got "
                             f"{type(m['content']).__name__}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only be the first message")
        if m["role"] == "system" and release:
            raise ValueError(f"message {i}: loss_mask='release' takes no system message (the "
                             "release's finetune.py always uses the default system prompt and "
                             "fails on a 'system' turn); drop it or use loss_mask='assistant'")
    if release and messages and messages[0]["role"] == "assistant":
        messages = messages[1:]  # the release drops a first turn that is not the user's
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}] + messages

    nl = tokenizer.encode("\n")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        role_ids = tokenizer.encode(m["role"], allow_special=False)
        content_ids = tokenizer.encode(m["content"], allow_special=False)
        reply = int(m["role"] == "assistant")
        if release:
            parts = [(start, 1), (role_ids + nl, 0), (content_ids, reply), (end + nl, 1)]
        else:
            parts = [(nl if i > 0 else [], 0), (start + role_ids + nl, 0),
                     (content_ids + end, reply)]
        for part, value in parts:
            ids += part
            mask += [value] * len(part)
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, mask = ids[:max_len], mask[:max_len]
    return EncodedConversation(np.asarray(ids, np.int32), np.asarray(mask, np.int32), truncated)


def stop_token_ids(tokenizer, chat_format: str = "chatml") -> list[int]:
    """Ids that end generation: `<|im_end|>`, `<|im_start|>` (chat) or `<|endoftext|>` (base)."""
    if chat_format == "chatml":
        return [tokenizer.im_end_id, tokenizer.im_start_id]
    if chat_format == "raw":
        return [tokenizer.eod_id]
    raise ValueError(f"unknown chat_format {chat_format!r}; expected 'chatml' or 'raw'")


def stop_words_ids(tokenizer, chat_format: str = "chatml") -> list[list[int]]:
    """The original's stop word sequences (raw adds "Human:" for its Human/Assistant demo)."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"unknown chat_format {chat_format!r}; expected 'chatml' or 'raw'")
