"""OpenAI function calling for Qwen v1 chat models, in the original release's ReAct format.

What the release's `openai_api.py` (QwenLM/Qwen, file last changed in a6085c2) does for
`functions` (report §3.4), with OpenAI `tools` / `tool_calls` accepted as well:

- `normalize_tools`: `tools` or legacy `functions` -> the release's function dicts, checked.
- `render`: OpenAI chat messages -> `make_context`'s (query, history, system). With tools, the
  ReAct instruction (a `TOOL_DESC` line per tool in `REACT_INSTRUCTION`) is put, as
  `{instruction}\\n\\nQuestion: {message}`, before the user message of the history's last
  exchange, or before the query when there is no history: the release's rule, so in [user,
  assistant, user] it goes before the FIRST user message. An assistant call is written
  `Thought: {content}\\nAction: {name}\\nAction Input: {arguments}`, a tool result
  `\\nObservation: {result}` in the same assistant turn, a past answer (with tools)
  `Thought: I now know the final answer.\\nFinal Answer: {content}`. A conversation ending
  with tool results continues that turn: `query` is None, the last history reply ends in
  `\\nThought:`, and `make_prompt` builds the release's text-completion prompt (the ChatML
  conversation without its last `<|im_end|>`), so the model writes on after `Thought:`.
- `stop_words`: ["Observation:"] with tools (a text stop word, as in the release).
- `parse` / `StreamParser`: a reply -> content, tool_calls, finish_reason (`parse_response`).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, NamedTuple, Sequence

from qwen_jax.data import chat_format

TOOL_DESC = ("{name_for_model}: Call this tool to interact with the {name_for_human} API. "
             "What is the {name_for_human} API useful for? {description_for_model} "
             "Parameters: {parameters}")
REACT_INSTRUCTION = """\
Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
# A past assistant answer in a conversation with tools (note the period the instruction lacks).
ANSWER_IN_HISTORY = "Thought: I now know the final answer.\nFinal Answer: {content}"
STOP_WORD = "Observation:"
ACTION, ACTION_INPUT, FINAL_ANSWER = "\nAction:", "\nAction Input:", "\nFinal Answer: "
ROLES = ("system", "user", "assistant", "tool", "function")
_MARKERS = (FINAL_ANSWER, ACTION, ACTION_INPUT, STOP_WORD)


class ToolError(ValueError):
    """A request the tool layer cannot render (the server answers it with a 400)."""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _function(fn: dict, where: str) -> dict:
    """One function dict, checked, with the release's fallbacks resolved (idempotent)."""
    for key in ("name", "name_for_model", "name_for_human", "description",
                "description_for_model"):
        if key in fn and not isinstance(fn[key], str):
            raise ToolError(f"{where}.{key} must be a string, got {_kind(fn[key])}")
    name = fn.get("name", "")
    name_m = fn.get("name_for_model", name)
    if not name_m:
        raise ToolError(f"{where} has no name: give 'name' (or 'name_for_model')")
    if any(c.isspace() for c in name_m):
        raise ToolError(f"{where}: the name {name_m!r} contains whitespace, which an "
                        "'Action:' line cannot carry")
    # OpenAI: omitted parameters = a function without arguments (the release required the key).
    params = fn.get("parameters", {})
    if not isinstance(params, (dict, list)):
        raise ToolError(f"{where}.parameters must be a JSON schema object, got {_kind(params)}")
    try:
        json.dumps(params, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ToolError(f"{where}.parameters is not JSON: {e}") from None
    desc = fn.get("description", "")
    return {"name": name or name_m, "description": desc, "parameters": params,
            "name_for_model": name_m, "name_for_human": fn.get("name_for_human", name),
            "description_for_model": fn.get("description_for_model", desc)}


def normalize_tools(tools: Sequence[dict] | None = None,
                    functions: Sequence[dict] | None = None) -> list[dict]:
    """OpenAI `tools` ([{"type": "function", "function": {name, description, parameters}}]) or
    legacy `functions` ([{name, description, parameters}]) -> the release's function dicts:
    {name, description, parameters, name_for_model, name_for_human, description_for_model}.

    The Qwen fields default as in the release (model name = name, human name = name, model
    description = description); `parameters` defaults to {}. An empty or missing list means no
    tools ([]). Raises ToolError naming the bad entry.
    """
    if tools and functions:
        raise ToolError("give either 'tools' or the legacy 'functions', not both")
    out: list[dict] = []
    for key, entries in (("tools", tools), ("functions", functions)):
        if entries is None:
            continue
        if not isinstance(entries, (list, tuple)):
            raise ToolError(f"'{key}' must be a list, got {_kind(entries)}")
        for n, entry in enumerate(entries):
            where = f"{key}[{n}]"
            if not isinstance(entry, dict):
                raise ToolError(f"{where} must be an object, got {_kind(entry)}")
            if key == "tools":
                if entry.get("type") != "function":
                    raise ToolError(f"{where}.type must be 'function', got "
                                    f"{entry.get('type')!r}")
                entry, where = entry.get("function"), where + ".function"
                if not isinstance(entry, dict):
                    raise ToolError(f"{where} must be an object with the function's name, "
                                    f"description and parameters, got {_kind(entry)}")
            fn = _function(entry, where)
            if any(f["name_for_model"] == fn["name_for_model"] for f in out):
                raise ToolError(f"{where}: the name {fn['name_for_model']!r} is already used "
                                "by an earlier tool")
            out.append(fn)
    return out


def react_instruction(tools: Sequence[dict]) -> str:
    """The release's ReAct instruction for these function dicts ('' without tools)."""
    tools = normalize_tools(functions=list(tools or []))
    if not tools:
        return ""
    lines = [TOOL_DESC.format(**{**f, "parameters": json.dumps(f["parameters"],
                                                                ensure_ascii=False)})
             for f in tools]
    text = REACT_INSTRUCTION.format(tools_text="\n\n".join(lines),
                                    tools_name_text=", ".join(f["name_for_model"] for f in tools))
    return text.lstrip("\n").rstrip()


def stop_words(tools: Sequence[dict] | None) -> list[str]:
    """Text stop words for a request: the release's "Observation:" when tools are present."""
    return [STOP_WORD] if tools else []


class Rendered(NamedTuple):
    """`make_context`'s arguments; `query` None = continue the last history reply."""
    query: str | None
    history: list[tuple[str, str]]
    system: str


def _content(value: Any, where: str) -> str:
    """A message's text: a string, None (""), or a list of {"type": "text", "text"} parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ToolError(f"{where}.content must be a string, null or a list of text parts, "
                    f"got {_kind(value)}")


def _calls(m: dict, where: str) -> list[tuple[str | None, str, str]]:
    """(id, name, arguments) of an assistant message's `tool_calls` or legacy `function_call`."""
    tool_calls, legacy = m.get("tool_calls"), m.get("function_call")
    if tool_calls and legacy:
        raise ToolError(f"{where} has both 'tool_calls' and 'function_call'")
    if legacy is not None:
        tool_calls, where = [{"type": "function", "function": legacy}], where + ".function_call"
    elif tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise ToolError(f"{where}.tool_calls must be a list, got {_kind(tool_calls)}")
        where += ".tool_calls"
    calls = []
    for k, call in enumerate(tool_calls or []):
        at = where if legacy is not None else f"{where}[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise ToolError(f"{at} must be a function call with 'name' and 'arguments'")
        name, args = fn.get("name"), fn.get("arguments", "")
        if not isinstance(name, str) or not name:
            raise ToolError(f"{at} has no function name")
        if isinstance(args, (dict, list)):
            args = json.dumps(args, ensure_ascii=False)
        elif not isinstance(args, str):
            raise ToolError(f"{at}: arguments must be a JSON string, got {_kind(args)}")
        calls.append((call.get("id"), name, args))
    return calls


def _events(messages: Sequence[dict]) -> list[tuple[int, str, str, tuple[str, str] | None]]:
    """(message index, role, content, call) in the release's one-call-per-message form: an
    assistant message with k calls becomes k call events, each followed by its result (matched
    by `tool_call_id`, else in order); results become role "result"."""
    events: list = []
    slots: list = []  # [call id, call event, result event] per call of the latest assistant

    def close():
        if any(s[2] for s in slots) and not all(s[2] for s in slots):
            n, _, _, (name, _) = next(s[1] for s in slots if s[2] is None)
            raise ToolError(f"messages[{n}]: the call of {name!r} has no tool result")
        for _, call, result in slots:
            events.extend([call] + ([result] if result else []))
        slots.clear()

    for n, m in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(m, dict):
            raise ToolError(f"{where} must be an object, got {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise ToolError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = _content(m.get("content"), where)
        if role in ("tool", "function"):
            free = [s for s in slots if s[2] is None]
            if not free:
                raise ToolError(f"{where}: a {role} message must answer a call of the assistant "
                                "message before it, and there is no call left to answer")
            cid = m.get("tool_call_id") if role == "tool" else None
            slot = next((s for s in free if s[0] == cid), None) if cid is not None else None
            if slot is None and cid is not None and all(s[0] is not None for s in free):
                raise ToolError(f"{where}: tool_call_id {cid!r} matches no unanswered call of "
                                "the assistant message before it")
            (slot or free[0])[2] = (n, "result", content, None)
            continue
        close()
        if role == "system" and n:
            raise ToolError(f"{where}: a system message may only come first")
        calls = _calls(m, where) if role == "assistant" else []
        slots += [[cid, (n, "assistant", content if k == 0 else "", (name, args)), None]
                  for k, (cid, name, args) in enumerate(calls)]
        if not calls:
            events.append((n, role, content, None))
    close()
    return events


def render(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> Rendered:
    """OpenAI chat messages -> (query, history, system) for `make_context` / `make_prompt`.

    Roles system (first only), user, assistant (`content`, may be None, plus `tool_calls` or
    legacy `function_call`), tool (`tool_call_id`) and legacy function. Texts are stripped as
    in the release (leading newlines, trailing whitespace). `tools`: `normalize_tools`'s dicts;
    without tools it is plain ChatML (a call in the history still written in the ReAct form,
    as the release does). The instruction's place and the continuation: the module doc.
    Raises ToolError naming the message (no user message, unknown role, a tool result without
    a call, two user messages in a row, not ending with a user or tool message, ...).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ToolError("'messages' must be a non-empty list")
    events = _events(messages)
    if all(role != "user" for _, role, _, _ in events):
        raise ToolError("'messages' has no user message")
    instruction = react_instruction(tools or [])
    system = chat_format.DEFAULT_SYSTEM
    turns: list[list] = []  # [role, text, message index]
    for k, (n, role, content, call) in enumerate(events):
        text = content.lstrip("\n").rstrip()
        if role == "system":
            system = text
        elif role == "user":
            turns.append(["user", text, n])
        elif role == "result":  # its call made turns[-1] an assistant turn
            turns[-1][1] += f"\nObservation: {text}"
            if k == len(events) - 1:
                turns[-1][1] += "\nThought:"  # the model writes on from here
        else:
            if not turns:
                raise ToolError(f"messages[{n}]: an assistant message needs a user message "
                                "before it")
            if call is not None:
                text = text if text.startswith("Thought:") else f"Thought: {text}"
                text += f"\nAction: {call[0]}\nAction Input: {call[1]}"
            elif instruction:
                text = ANSWER_IN_HISTORY.format(content=text)
            if turns[-1][0] == "user":
                turns.append(["assistant", text.lstrip("\n").rstrip(), n])
            else:
                turns[-1][1] += "\n" + text
    last_n, last_role = events[-1][0], events[-1][1]
    if last_role == "assistant":
        raise ToolError(f"messages[{last_n}]: the conversation must end with a user or tool "
                        "message, not an assistant message")
    for idx, (role, _, n) in enumerate(turns):
        if role != ("user", "assistant")[idx % 2]:  # only a user turn can be out of place
            raise ToolError(f"messages[{n}]: two user messages in a row; every user message "
                            "but the last needs an assistant reply")
    query = turns.pop()[1] if last_role == "user" else None
    history = [(turns[a][1].lstrip("\n").rstrip(), turns[a + 1][1].lstrip("\n").rstrip())
               for a in range(0, len(turns), 2)]
    if instruction and history:
        history[-1] = (f"{instruction}\n\nQuestion: {history[-1][0]}", history[-1][1])
    elif instruction:
        query = f"{instruction}\n\nQuestion: {query}"
    return Rendered(query, history, system)


def make_prompt(tokenizer, query: str | None, history: Sequence[Sequence[str]],
                system: str = chat_format.DEFAULT_SYSTEM,
                max_window_size: int = 6144) -> tuple[str, list[int]]:
    """(raw_text, ids) of a rendered request.

    With a query: `make_context` (ChatML, history newest-first within max_window_size). With
    query None: the release's `text_complete_last_message` prompt, every turn kept and the
    last reply left open (no `<|im_end|>`); its ids are the release's (which encodes the whole
    text at once) with message text kept as plain text like `make_context` does.
    """
    if query is not None:
        return chat_format.make_context(tokenizer, query, history, system, max_window_size)
    if not history:
        raise ToolError("nothing to continue: a prompt without a query needs a history")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, allow_special=False)

    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], encode("\n")
    raw, ids = f"<|im_start|>system\n{system}<|im_end|>", start + encode(f"system\n{system}") + end
    for q, r in history:
        q, r = q.lstrip("\n").rstrip(), r.lstrip("\n").rstrip()
        raw += f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>"
        ids += (nl + start + encode(f"user\n{q}") + end
                + nl + start + encode(f"assistant\n{r}") + end)
    return raw[:-len("<|im_end|>")], ids[:-1]


def _call(text: str) -> tuple[str, str, str] | None:
    """(name, arguments, thought) when `text` (cut at the stop word) is a call, else None."""
    i, j = text.find(ACTION), text.find(ACTION_INPUT)
    if not 0 <= i < j:
        return None
    name = text[i + len(ACTION):j].strip()
    if not name:
        return None
    thought, t = text[:i], text[:i].find("Thought: ")
    thought = thought[t + len("Thought: "):] if t >= 0 else thought
    return name, text[j + len(ACTION_INPUT):].strip(), thought.strip()


def parse(text: str, tools: Sequence[dict] | None) -> dict:
    """A generated reply -> {"content", "tool_calls", "finish_reason"} (the release's rule).

    Without tools: the whole text, no calls, "stop". With tools the text is first cut at the
    stop word "Observation:" (as the release trims its stop words; the server trims the
    request's own `stop` words before). A reply whose first `\\nAction:` comes before its first
    `\\nAction Input:` is one call: name between them, arguments from there to the end (both
    stripped), content the text before `\\nAction:` after its first `Thought: ` (stripped; None
    when empty), finish_reason "tool_calls". Otherwise the content is the text after the last
    `\\nFinal Answer: ` (unstripped), or the whole text, and finish_reason "stop". The call's
    name is not checked against the tools (neither does the release).
    """
    if not tools:
        return {"content": text, "tool_calls": [], "finish_reason": "stop"}
    cut = text.find(STOP_WORD)
    text = text[:cut] if cut >= 0 else text
    call = _call(text)
    if call is not None:
        name, args, thought = call
        return {"content": thought or None, "finish_reason": "tool_calls",
                "tool_calls": [{"id": "call_" + secrets.token_hex(12), "type": "function",
                                "function": {"name": name, "arguments": args}}]}
    z = text.rfind(FINAL_ANSWER)
    return {"content": text[z + len(FINAL_ANSWER):] if z >= 0 else text, "tool_calls": [],
            "finish_reason": "stop"}


def _partial_marker(text: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of a marker."""
    return max((n for marker in _MARKERS for n in range(1, len(marker))
                if text.endswith(marker[:n])), default=0)


class StreamParser:
    """`parse`, incrementally: `feed(delta)` returns content to send now, `finish()` returns
    (the last content delta, `parse(whole text, tools)`).

    What is streamed when:
    - without tools: every delta, as it comes;
    - with tools: nothing until the reply has a `\\nFinal Answer: ` marker; then the text after
      it as it comes, except (held back until a later delta settles it) an end that may be the
      beginning of a marker (`\\nFinal Answer: `, `\\nAction:`, `\\nAction Input:`,
      `Observation:`) and anything from an `\\nAction:` that an `\\nAction Input:` may still
      follow. Nothing after the stop word `Observation:`. The thought before an answer is
      never sent; a reply without markers and a call's content (its thought) come whole as
      the last delta, since only the end of the reply decides them.

    For every reply and every way of cutting it into deltas, `finish()`'s result equals
    `parse` on the whole text (up to the random call id), and the deltas joined are its
    content ("" for None). The exception is a reply that rewrites an answer already partly
    sent: a second `\\nFinal Answer: `, or an Action / Action Input pair, after the answer
    text. Text sent cannot be taken back; then `diverged` is True, the stream stops sending,
    the last delta is "" and the result is still `parse`'s.
    """

    def __init__(self, tools: Sequence[dict] | None):
        self.tools = list(tools or [])
        self.text = ""       # the reply so far
        self.streamed = ""   # the content sent so far
        self.diverged = False
        self._start: int | None = None  # where the sent answer begins in `text`

    def feed(self, delta: str) -> str:
        self.text += delta
        out = delta if not self.tools else self._ready()
        self.streamed += out
        return out

    def _ready(self) -> str:
        if self.diverged:
            return ""
        text, final = self.text, False
        cut = text.find(STOP_WORD)
        if cut >= 0:
            text, final = text[:cut], True
        if _call(text) is not None:
            self.diverged = bool(self.streamed)
            return ""
        z = text.rfind(FINAL_ANSWER)
        if z < 0:
            return ""
        if self._start != z + len(FINAL_ANSWER):
            if self.streamed:
                self.diverged = True
                return ""
            self._start = z + len(FINAL_ANSWER)
        end = len(text)
        i, j = text.find(ACTION), text.find(ACTION_INPUT)
        if i >= 0 and j < 0:  # an Action Input may still make this a call
            end = i
        if not final:
            end -= _partial_marker(text[:end])
        sent = self._start + len(self.streamed)
        return text[sent:end] if end > sent else ""

    def finish(self) -> tuple[str, dict]:
        result = parse(self.text, self.tools)
        content = result["content"] or ""
        if self.diverged or not content.startswith(self.streamed):
            self.diverged = True
            return "", result
        rest, self.streamed = content[len(self.streamed):], content
        return rest, result
