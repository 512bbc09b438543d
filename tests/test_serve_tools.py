"""OpenAI tools -> the release's ReAct prompts (openai_api.py) and replies -> tool_calls.

The expected prompts are written out by hand from the release's TOOL_DESC / REACT_INSTRUCTION
templates (QwenLM/Qwen openai_api.py as of a6085c2), character for character.
"""

import random
import re

import pytest

from qwen_jax.data import chat_format
from qwen_jax.data.tokenizer import ByteTokenizer, QwenTokenizer
from qwen_jax.serve import tools as T

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                             "description": "城市名"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "google_search",
                                           "description": "Search the web.",
                                           "parameters": {"type": "object", "properties": {}}}}
FORMAT = """Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
WEATHER_LINE = ('get_weather: Call this tool to interact with the get_weather API. What is the '
                'get_weather API useful for? Get the current weather in a city. Parameters: '
                '{"type": "object", "properties": {"city": {"type": "string", "description": '
                '"城市名"}}, "required": ["city"]}')
INSTRUCTION = ("Answer the following questions as best you can. You have access to the "
               "following APIs:\n\n" + WEATHER_LINE + "\n\n"
               + FORMAT.replace("{names}", "get_weather"))
QUESTION = "What's the weather in Beijing?"
CALL_REPLY = 'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "北京"}'
RESULT = '{"temperature": 25, "condition": "sunny"}'
ID_RE = re.compile(r"call_[0-9a-f]{24}")


@pytest.fixture(scope="module")
def qwen(qwen_tiktoken_path):
    return QwenTokenizer(qwen_tiktoken_path)


@pytest.fixture(params=["qwen", "byte"])
def tok(request, qwen):
    return qwen if request.param == "qwen" else ByteTokenizer()


def without_ids(result):
    for call in result["tool_calls"]:
        assert ID_RE.fullmatch(call["id"]), call["id"]
    return {**result, "tool_calls": [{**c, "id": "ID"} for c in result["tool_calls"]]}


def call_message(content="I should look it up.", args='{"city": "北京"}', call_id="call_1"):
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": args}}]}


def test_one_tool_prompt_exact(tok):
    tools = T.normalize_tools(tools=[WEATHER])
    query, history, system = T.render([{"role": "user", "content": QUESTION}], tools)
    assert query == INSTRUCTION + "\n\nQuestion: " + QUESTION
    assert (history, system) == ([], "You are a helpful assistant.")
    raw, ids = T.make_prompt(tok, query, history, system)
    assert raw == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
                   "user\n" + INSTRUCTION + "\n\nQuestion: " + QUESTION
                   + "<|im_end|>\n<|im_start|>assistant\n")
    assert (raw, ids) == chat_format.make_context(tok, query, history, system)
    assert T.stop_words(tools) == ["Observation:"] and T.stop_words([]) == []


def test_action_becomes_a_tool_call():
    tools = T.normalize_tools(tools=[WEATHER])
    expected = {"content": "I should look it up.", "finish_reason": "tool_calls",
                "tool_calls": [{"id": "ID", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "北京"}'}}]}
    # with the stop word kept by the sampler, cut before it, or with trailing space
    for reply in (CALL_REPLY + "\nObservation:", CALL_REPLY, CALL_REPLY + " \n",
                  CALL_REPLY + "\nObservation: made up\nThought: more"):
        assert without_ids(T.parse(reply, tools)) == expected, reply
    # no "Thought: " -> the text before the Action is the content; none -> content None
    got = T.parse("Let me check.\nAction: get_weather\nAction Input: {}", tools)
    assert got["content"] == "Let me check."
    assert got["tool_calls"][0]["function"]["arguments"] == "{}"
    assert T.parse("Thought: \nAction: get_weather\nAction Input: {}", tools)["content"] is None
    a, b = (T.parse(CALL_REPLY, tools)["tool_calls"][0]["id"] for _ in range(2))
    assert a != b


def test_final_answer():
    tools = T.normalize_tools(tools=[WEATHER])
    reply = "Thought: I now know the final answer\nFinal Answer: 25°C and sunny.\n\nEnjoy!"
    assert T.parse(reply, tools) == {"content": "25°C and sunny.\n\nEnjoy!", "tool_calls": [],
                                     "finish_reason": "stop"}
    two = "Thought: x\nFinal Answer: first\nFinal Answer: second"
    assert T.parse(two, tools)["content"] == "second"  # the last one, as in the release
    # an Action without an Action Input after it is no call
    odd = "Thought: x\nAction: get_weather\nFinal Answer: done"
    assert T.parse(odd, tools)["content"] == "done"


def test_several_tools_in_order():
    legacy = {"name_for_human": "谷歌搜索", "name_for_model": "google_search",
              "description_for_model": "谷歌搜索是一个通用搜索引擎。 Format the arguments as a "
                                       "JSON object.",
              "parameters": [{"name": "search_query", "required": True,
                              "schema": {"type": "string"}}]}
    tools = T.normalize_tools(functions=[WEATHER["function"], legacy, SEARCH["function"] | {
        "name": "web_search"}])
    query, history, _ = T.render([{"role": "user", "content": "hi"}], tools)
    lines = [WEATHER_LINE,
             "google_search: Call this tool to interact with the 谷歌搜索 API. What is the "
             "谷歌搜索 API useful for? 谷歌搜索是一个通用搜索引擎。 Format the arguments as a "
             "JSON object. "
             'Parameters: [{"name": "search_query", "required": true, "schema": {"type": '
             '"string"}}]',
             "web_search: Call this tool to interact with the web_search API. What is the "
             'web_search API useful for? Search the web. Parameters: {"type": "object", '
             '"properties": {}}']
    assert query == ("Answer the following questions as best you can. You have access to the "
                     "following APIs:\n\n" + "\n\n".join(lines) + "\n\n"
                     + FORMAT.replace("{names}", "get_weather, google_search, web_search")
                     + "\n\nQuestion: hi")
    assert T.normalize_tools(functions=tools) == tools  # idempotent


def test_plain_answers_and_no_tools(tok):
    tools = T.normalize_tools(tools=[WEATHER])
    assert T.parse("Hello! How can I help?", tools) == {
        "content": "Hello! How can I help?", "tool_calls": [], "finish_reason": "stop"}
    assert T.parse(CALL_REPLY, None)["content"] == CALL_REPLY  # no tools: no parsing
    messages = [{"role": "system", "content": "\nBe brief. \n"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]
    assert T.render(messages, T.normalize_tools()) == ("Weather?", [("hi", "Hello.")],
                                                       "Be brief.")
    raw, ids = T.make_prompt(tok, *T.render(messages))
    assert raw == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                   "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWeather?"
                   "<|im_end|>\n<|im_start|>assistant\n")


def test_round_trip_continues_the_assistant_turn(tok, qwen):
    tools = T.normalize_tools(tools=[WEATHER])
    called = T.parse(CALL_REPLY + "\nObservation:", tools)
    user = {"role": "user", "content": QUESTION}
    messages = [user, {"role": "assistant", **{k: called[k] for k in ("content", "tool_calls")}},
                {"role": "tool", "tool_call_id": called["tool_calls"][0]["id"],
                 "content": RESULT}]
    query, history, system = T.render(messages, tools)
    turn = CALL_REPLY + "\nObservation: " + RESULT + "\nThought:"
    assert (query, history) == (None, [(INSTRUCTION + "\n\nQuestion: " + QUESTION, turn)])
    raw, ids = T.make_prompt(tok, query, history, system)
    assert raw == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
                   "user\n" + INSTRUCTION + "\n\nQuestion: " + QUESTION + "<|im_end|>\n"
                   "<|im_start|>assistant\n" + turn)
    if tok is qwen:  # the release encodes the whole completion prompt at once
        assert ids == tok.encode(raw)
    reply = " I now know the final answer.\nFinal Answer: Sunny, 25°C."
    assert T.parse(reply, tools)["content"] == "Sunny, 25°C."
    # the answer joins the same turn; the release keeps the instruction on the last
    # exchange of the history, so the new question goes without it
    messages += [{"role": "assistant", "content": "Sunny, 25°C."},
                 {"role": "user", "content": "And Shanghai?"}]
    answered = turn[:-len("\nThought:")] + ("\nThought: I now know the final answer.\n"
                                            "Final Answer: Sunny, 25°C.")
    assert T.render(messages, tools)[:2] == (
        "And Shanghai?", [(INSTRUCTION + "\n\nQuestion: " + QUESTION, answered)])


def test_legacy_functions_and_function_call():
    tools = T.normalize_tools(tools=[WEATHER])
    legacy = T.normalize_tools(functions=[WEATHER["function"]])
    assert legacy == tools
    new = [{"role": "user", "content": QUESTION}, call_message(),
           {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    old = [{"role": "user", "content": QUESTION},
           {"role": "assistant", "content": "I should look it up.",
            "function_call": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
           {"role": "function", "name": "get_weather", "content": RESULT}]
    assert T.render(old, legacy) == T.render(new, tools)
    # arguments as an object are dumped like the release dumps parameters
    obj = [new[0], call_message(args={"city": "北京"}), new[2]]
    assert T.render(obj, tools) == T.render(new, tools)


def test_parallel_calls_are_interleaved_with_their_results():
    tools = T.normalize_tools(tools=[WEATHER])
    two = call_message(content=None)
    two["tool_calls"].append({"id": "call_2", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "上海"}'}})
    messages = [{"role": "user", "content": "Beijing and Shanghai?"}, two,
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
                {"role": "tool", "tool_call_id": "call_1", "content": "sun"}]
    assert T.render(messages, tools).history[0][1] == (
        'Thought: \nAction: get_weather\nAction Input: {"city": "北京"}\nObservation: sun\n'
        'Thought: \nAction: get_weather\nAction Input: {"city": "上海"}\nObservation: rain\n'
        "Thought:")


REPLIES = [
    CALL_REPLY + "\nObservation:",
    CALL_REPLY,
    "Thought: I now know the final answer\nFinal Answer: Sunny, 25°C.\nAction items: none",
    " I now know the final answer.\nFinal Answer: line one\nline two\n\nObservation: x",
    "Hello! No tools needed.\nFinal answer: lower case is no marker",
    "Thought: hmm\nAction: get_weather\nFinal Answer: held back\nFinal Answer: the end",
    "Thought: x\nAction Input: {}\nAction: late\nFinal Answer: ok\nAction: also ok",
    "Final Answer: no newline before it",
]


def chunkings(text, rng):
    for size in (1, 2, 3):
        yield [text[k:k + size] for k in range(0, len(text), size)]
    for _ in range(60):
        cuts, k = [], 0
        while k < len(text):
            cuts.append(text[k:k + (n := rng.randint(1, 3))])
            k += n
        yield cuts


@pytest.mark.parametrize("with_tools", [True, False])
def test_stream_parser_equals_parse(with_tools):
    tools = T.normalize_tools(tools=[WEATHER]) if with_tools else []
    rng = random.Random(0)
    for reply in REPLIES:
        expected = without_ids(T.parse(reply, tools))
        content = expected["content"] or ""
        for chunks in chunkings(reply, rng):
            stream = T.StreamParser(tools)
            sent = ""
            for chunk in chunks:
                sent += stream.feed(chunk)
                assert content.startswith(sent), (reply, chunks, sent)  # nothing leaks
            last, result = stream.finish()
            assert sent + last == content and not stream.diverged, (reply, chunks)
            assert without_ids(result) == expected
    if with_tools:  # what is sent before the end
        stream = T.StreamParser(tools)
        assert [stream.feed(c) for c in ("Thought: a\nFinal", " Answer: Hi", "\nFin", "e")] == [
            "", "Hi", "", "\nFine"]
        assert stream.finish()[0] == ""


def test_stream_parser_divergence_keeps_parse_result():
    tools = T.normalize_tools(tools=[WEATHER])
    for reply in ("Thought: x\nFinal Answer: first\nFinal Answer: second",
                  "Thought: x\nFinal Answer: first\nAction: get_weather\nAction Input: {}"):
        stream = T.StreamParser(tools)
        sent = "".join(stream.feed(c) for c in reply)
        assert sent == "first"
        last, result = stream.finish()
        assert stream.diverged and last == ""
        assert without_ids(result) == without_ids(T.parse(reply, tools))


@pytest.mark.parametrize("kwargs, message", [
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "not both"),
    ({"tools": {"a": 1}}, "'tools' must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type must be 'function'"),
    ({"tools": [{"type": "function"}]}, "tools[0].function must be an object"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function has no name"),
    ({"functions": [{"name": "a b"}]}, "functions[0]: the name 'a b' contains whitespace"),
    ({"functions": [{"name": "f", "parameters": "{}"}]}, "functions[0].parameters must be"),
    ({"functions": [{"name": "f", "description": 3}]}, "functions[0].description must be"),
    ({"functions": [{"name": "f"}, {"name": "f"}]}, "functions[1]: the name 'f' is already"),
])
def test_tool_errors(kwargs, message):
    with pytest.raises(T.ToolError, match=re.escape(message)):
        T.normalize_tools(**kwargs)


USER = {"role": "user", "content": QUESTION}


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([USER, {"role": "robot", "content": "x"}], "messages[1]: unknown role 'robot'"),
    ([USER, {"role": "tool", "tool_call_id": "c", "content": "x"}],
     "messages[1]: a tool message must answer a call"),
    ([USER, {"role": "assistant", "content": "hi"}, {"role": "function", "content": "x"}],
     "messages[2]: a function message must answer a call"),
    ([USER, call_message(), {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
     "messages[2]: tool_call_id 'call_9' matches no unanswered call"),
    ([USER, call_message()], "messages[1]: the conversation must end with a user or tool"),
    ([USER, {"role": "assistant", "content": "hi"}], "must end with a user or tool"),
    ([{"role": "assistant", "content": "hi"}, USER], "messages[0]: an assistant message needs"),
    ([USER, USER], "messages[1]: two user messages in a row"),
    ([USER, USER, {"role": "assistant", "content": "a"}, USER], "messages[1]: two user"),
    ([USER, {"role": "system", "content": "s"}], "messages[1]: a system message may only"),
    ([USER, {"role": "user", "content": 5}], "messages[1].content must be a string"),
    ([USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[1].tool_calls[0] has no function name"),
    ([USER, {"role": "assistant", "function_call": {"name": "f", "arguments": 1}}],
     "messages[1].function_call: arguments must be a JSON string"),
])
def test_render_errors(messages, message):
    with pytest.raises(T.ToolError, match=re.escape(message)):
        T.render(messages, T.normalize_tools(tools=[WEATHER]))


def test_unanswered_parallel_call_is_refused():
    two = call_message()
    two["tool_calls"].append({"id": "call_2", "type": "function",
                              "function": {"name": "get_weather", "arguments": "{}"}})
    messages = [USER, two, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]
    with pytest.raises(T.ToolError, match=re.escape("messages[1]: the call of 'get_weather' "
                                                    "has no tool result")):
        T.render(messages, T.normalize_tools(tools=[WEATHER]))
    with pytest.raises(T.ToolError, match="nothing to continue"):
        T.make_prompt(ByteTokenizer(), None, [], "s")
