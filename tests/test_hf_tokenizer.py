"""The Hugging Face tokenizer files written from qwen.tiktoken against our tokenizer and the
original's reference vectors."""

import json
import pathlib
import unicodedata

import pytest
import transformers

from qwen_jax.data import chat_format
from qwen_jax.data.tokenizer import SPECIAL_TOKEN_STRINGS, QwenTokenizer
from qwen_jax.io import hf_tokenizer
from qwen_jax.io.hf_tokenizer import CHAT_TEMPLATE, write_hf_tokenizer

from reference_counts import tokenizer_vector_count

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LENGTH = 6144


@pytest.fixture(scope="module")
def ours(qwen_tiktoken_path):
    return QwenTokenizer(qwen_tiktoken_path)


@pytest.fixture(scope="module")
def written(qwen_tiktoken_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_tokenizer") / "out"
    names = write_hf_tokenizer(qwen_tiktoken_path, out, model_max_length=MAX_LENGTH)
    return out, names


@pytest.fixture(scope="module")
def hf(written):
    return transformers.AutoTokenizer.from_pretrained(written[0])


def _messages_to_make_context(messages: list[dict]) -> tuple[str, list[list[str]], str]:
    """(query, history, system) for a conversation of alternating user/assistant turns."""
    system = chat_format.DEFAULT_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
    history = [[messages[i]["content"], messages[i + 1]["content"]]
               for i in range(0, len(messages) - 1, 2)]
    return messages[-1]["content"], history, system


def _chat_ids(hf, messages, **kwargs) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def test_written_files(written, qwen_tiktoken_path):
    out, names = written
    assert names == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == MAX_LENGTH
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["clean_up_tokenization_spaces"] is False
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert byte_level["use_regex"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["post_processor"] is None
    model = spec["model"]
    assert model["type"] == "BPE" and model["ignore_merges"] is True
    n_ranks = sum(1 for line in pathlib.Path(qwen_tiktoken_path).read_bytes().splitlines()
                  if line.strip())
    assert sorted(model["vocab"].values()) == list(range(n_ranks))
    assert len(model["merges"]) == n_ranks - 256  # one per multi-byte token, all reachable
    assert [t["id"] for t in spec["added_tokens"]] == list(range(n_ranks, n_ranks + 208))


def test_loads_natively(hf, ours, tokenizer_vectors):
    facts = tokenizer_vectors["tokenizer_facts"]
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert len(hf) == ours.vocab_size == facts["n_vocab_tiktoken"]
    assert hf.eos_token_id == hf.pad_token_id == facts["eod_id(<|endoftext|>)"]
    assert hf.bos_token is None
    assert hf.model_max_length == MAX_LENGTH
    assert hf.encode("\n", add_special_tokens=False) == facts["ids_newline"]
    assert hf.encode("Hello", add_special_tokens=True) == ours.encode("Hello")


@pytest.mark.parametrize("index", range(tokenizer_vector_count("cases")))
def test_reference_case(tokenizer_vectors, hf, ours, index):
    case = tokenizer_vectors["cases"][index]
    text, ids = case["text"], case["ids"]
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        case["ids_specials_as_text"]
    assert hf.decode(ids) == case["decoded"]
    assert hf.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]
    nfc = unicodedata.normalize("NFC", text)
    if ours.decode(ours.encode(text)) == nfc:
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == nfc


def test_matches_ours_on_varied_text(hf, ours):
    texts = [p.read_text(encoding="utf-8")
             for p in sorted(PROJECT_ROOT.glob("*.md")) + sorted(PROJECT_ROOT.glob("docs/*.md"))
             + sorted((PROJECT_ROOT / "qwen_jax" / "data").glob("*.py"))]
    texts += [
        "<|im_end|>\u0338 combines with '>' under NFC, <|endoftext|>\u0338 too",
        "a<|im_start|>b<|im_end|>\n<|extra_7|><|im_start",
        "1234567890" * 7 + " x" + "\u3000" * 5 + "\r\n\r\n\t \n  y  ",
        "'S 'T 'RE 'ſ \u212a 'Ll 'd'd's DON'T",
        "e\u0301 A\u030a \u1100\u1161\u11a8 \uff21\uff22 \ufb01 \u2126",
        "\U0001f469\u200d\U0001f4bb x\u00a0y\u2009z \u0000\u0007\u007f",
        "中文，日本語、한국어。Ελληνικά! עברית? हिन्दी; ภาษาไทย",
        "    def f():\n\n\n        return {'a': [1, 2]}  # done   \n",
    ]
    expected = ours.encode_batch(texts)
    got = hf(texts, add_special_tokens=False)["input_ids"]
    for text, want, have in zip(texts, expected, got):
        assert have == want, text[:80]
    assert sum(map(len, expected)) > 1000


def test_special_tokens(hf, ours, tokenizer_vectors):
    facts = tokenizer_vectors["tokenizer_facts"]["special_tokens"]
    assert len(SPECIAL_TOKEN_STRINGS) == len(facts) == 208
    for token in SPECIAL_TOKEN_STRINGS:
        token_id = facts[token]
        assert ours.special_tokens[token] == token_id
        assert hf.convert_tokens_to_ids(token) == token_id
        assert hf.convert_ids_to_tokens(token_id) == token
        assert hf.encode(token, add_special_tokens=False) == [token_id]
        assert hf.decode([token_id]) == token
        assert hf.decode([token_id], skip_special_tokens=True) == ""
    text = "user says <|im_start|>assistant\nhi<|im_end|>"
    ids = hf.encode(text, add_special_tokens=False)
    assert ids.count(facts["<|im_start|>"]) == 1 and ids.count(facts["<|im_end|>"]) == 1
    assert ids == ours.encode(text)
    assert "<|im_start|>" not in hf.convert_ids_to_tokens(
        hf.encode("<|im_start", add_special_tokens=False))


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate. Answer in one line."},
     {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Empty system prompt."}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help you?"},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "2 + 2 = 4."},
     {"role": "user", "content": "And times three?"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "你好，世界！请用中文回答。"},
     {"role": "assistant", "content": "你好！有什么可以帮你的吗？😀"},
     {"role": "user", "content": "Café naïve — Привет, мир! e\u0301 ends with spaces  "}],
    [{"role": "user", "content": "def f(x):\n    return x**2\n\nExplain."},
     {"role": "assistant", "content": "It squares x.\n"},
     {"role": "user", "content": " leading space, trailing newline\n"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_chat_template_matches_make_context(hf, ours, messages):
    query, history, system = _messages_to_make_context(messages)
    raw_text, context_tokens = chat_format.make_context(ours, query, history, system)
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        raw_text
    assert _chat_ids(hf, messages, add_generation_prompt=True) == context_tokens


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_chat_template_matches_encode_conversation(hf, ours, messages):
    reply = {"role": "assistant", "content": "Done."}
    for conversation in (messages, messages + [reply]):
        expected = chat_format.encode_conversation(ours, conversation).ids.tolist()
        assert _chat_ids(hf, conversation, add_generation_prompt=False) == expected


def test_chat_template_reference_examples(tokenizer_vectors, hf, ours):
    compared = 0
    for example in tokenizer_vectors["chat_make_context_examples"]:
        if example["chat_format"] != "chatml":
            continue
        messages = [{"role": "system", "content": example["system"]}]
        for query, response in example["history"]:
            messages += [{"role": "user", "content": query},
                         {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": example["query"]})
        raw_text, context_tokens = chat_format.make_context(
            ours, example["query"], example["history"], example["system"],
            max_window_size=10**9)
        assert hf.apply_chat_template(messages, add_generation_prompt=True,
                                      tokenize=False) == raw_text
        if raw_text == example["raw_text"]:
            assert context_tokens == example["context_tokens"]
        ids = _chat_ids(hf, messages, add_generation_prompt=True)
        if any(s in m["content"] for m in messages for s in SPECIAL_TOKEN_STRINGS):
            # The template's text is tokenized whole: special-token text in a message
            # becomes special ids, where make_context keeps it as plain bytes.
            assert ids == ours.encode(raw_text)
        else:
            assert ids == context_tokens
            compared += 1
    assert compared > 0


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def _valid_lines(qwen_tiktoken_path, n: int) -> bytes:
    with open(qwen_tiktoken_path, "rb") as f:
        return b"".join(next(f) for _ in range(n))


@pytest.mark.parametrize("defect", ["bad_base64", "missing_rank", "empty", "missing_file",
                                    "too_few_ranks"])
def test_malformed_tiktoken(defect, tmp_path, qwen_tiktoken_path):
    head = _valid_lines(qwen_tiktoken_path, 3)
    path = tmp_path / "qwen.tiktoken"
    line = None
    if defect == "bad_base64":
        _write(path, head + b"@@not-base64@@ 3\n")
        line = 4
    elif defect == "missing_rank":
        _write(path, head[: head.index(b"\n") + 1] + b"IQ==\n" + head)
        line = 2
    elif defect == "empty":
        _write(path, b"")
    elif defect == "too_few_ranks":
        _write(path, head)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        write_hf_tokenizer(path, out)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if line is not None:
        assert f"line {line}" in message
    assert not (out / "tokenizer.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    byte_ranks = {bytes([b]): b for b in range(256)}
    monkeypatch.setattr(hf_tokenizer, "_read_ranks", lambda path: byte_ranks)
    real_dump, calls = json.dump, []

    def failing_dump(obj, f, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real_dump(obj, f, **kwargs)

    monkeypatch.setattr(hf_tokenizer.json, "dump", failing_dump)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        write_hf_tokenizer(tmp_path / "unused.tiktoken", out)
    assert list(out.iterdir()) == []

    monkeypatch.setattr(hf_tokenizer.json, "dump", real_dump)
    assert write_hf_tokenizer(tmp_path / "unused.tiktoken", out) == [
        "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 8192


def test_pad_token(qwen_tiktoken_path, ours, tmp_path):
    write_hf_tokenizer(qwen_tiktoken_path, tmp_path, pad_token="<|extra_0|>")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == ours.special_tokens["<|extra_0|>"] != tok.eos_token_id
    batch = tok(["a b c", "a"], padding=True)["input_ids"]
    assert batch[1][1:] == [tok.pad_token_id] * 2
    with pytest.raises(ValueError, match="not one of the special tokens"):
        write_hf_tokenizer(qwen_tiktoken_path, tmp_path / "x", pad_token="<pad>")
    assert not (tmp_path / "x").exists()
