"""Every case of tokenizer_vectors.json against the original QWenTokenizer's outputs."""

import unicodedata

import pytest

from qwen_jax.data import chat_format
from qwen_jax.data.tokenizer import (
    PAT_STR,
    QwenTokenizer,
    TokenizerFileError,
    load_tokenizer,
    pieces_hex,
)

from reference_counts import tokenizer_vector_count


@pytest.fixture(scope="module")
def tok(qwen_tiktoken_path):
    return QwenTokenizer(qwen_tiktoken_path)


def test_facts(tokenizer_vectors, tok):
    facts = tokenizer_vectors["tokenizer_facts"]
    assert tok.special_tokens == facts["special_tokens"]
    assert tok.vocab_size == facts["n_vocab_tiktoken"]
    assert tok.eod_id == facts["eod_id(<|endoftext|>)"]
    assert tok.im_start_id == facts["im_start_id"]
    assert tok.im_end_id == facts["im_end_id"]
    assert tok.encode("\n") == facts["ids_newline"]
    for word, ids in facts["ids_system_user_assistant"].items():
        assert tok.encode(word, allow_special=False) == ids
    assert chat_format.stop_words_ids(tok, "chatml") == facts["stop_words_ids_chatml"]
    assert chat_format.stop_words_ids(tok, "raw") == facts["stop_words_ids_raw"]
    assert PAT_STR == facts["pat_str"]


@pytest.mark.parametrize("index", range(tokenizer_vector_count("cases")))
def test_case(tokenizer_vectors, tok, index):
    case = tokenizer_vectors["cases"][index]
    text = case["text"]
    assert tok.encode(text) == case["ids"]
    assert tok.encode(text, allow_special=False) == case["ids_specials_as_text"]
    assert tok.encode_batch([text, text])[1] == case["ids"]
    assert tok.encode_batch([text], allow_special=False)[0] == case["ids_specials_as_text"]
    if case["raises_if_disallowed_special_all"]:
        with pytest.raises(ValueError, match="disallowed special token"):
            tok.encode(text, allow_special=False, disallowed_special="all")
    else:
        assert (tok.encode(text, allow_special=False, disallowed_special="all")
                == case["ids_specials_as_text"])
    # Optional fields of the layout are checked whenever the case carries them.
    if "pieces_hex" in case:
        assert pieces_hex(tok, case["ids"]) == case["pieces_hex"]
    if "pieces_special" in case:
        pieces = tok.convert_ids_to_tokens(case["ids"])
        assert [p if isinstance(p, str) else None for p in pieces] == case["pieces_special"]
    if "decoded" in case:
        assert tok.decode(case["ids"]) == case["decoded"]
    if "decoded_specials_as_text" in case:
        assert tok.decode(case["ids_specials_as_text"]) == case["decoded_specials_as_text"]
    if "decoded_skip_special" in case:
        assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    nfc = unicodedata.normalize("NFC", text)
    if "nfc_changes_text" in case:
        assert (nfc != text) == case["nfc_changes_text"]
    if "roundtrip_equals_nfc_text" in case:
        assert (tok.decode(case["ids"]) == nfc) == case["roundtrip_equals_nfc_text"]


@pytest.mark.parametrize("index", range(tokenizer_vector_count("chat_make_context_examples")))
def test_make_context(tokenizer_vectors, tok, index):
    ex = tokenizer_vectors["chat_make_context_examples"][index]
    raw_text, tokens = chat_format.make_context(
        tok, ex["query"], history=[tuple(h) for h in ex.get("history") or []],
        system=ex.get("system", chat_format.DEFAULT_SYSTEM),
        max_window_size=ex.get("max_window_size", 6144),
        chat_format=ex.get("chat_format", "chatml"))
    assert raw_text == ex["raw_text"]
    assert tokens == ex["context_tokens"]


def test_history_truncation_newest_first(tok):
    history = [(f"question {i} " * 20, f"answer {i} " * 20) for i in range(6)]
    _, none = chat_format.make_context(tok, "last?", history=[])
    turn_lens = {len(chat_format.make_context(tok, "last?", history=[h])[1]) - len(none)
                 for h in history}
    assert len(turn_lens) == 1
    (turn,) = turn_lens
    system = len(tok.encode(f"system\n{chat_format.DEFAULT_SYSTEM}", allow_special=False)) + 2
    # The original keeps turns while system + kept turns stay STRICTLY below the window.
    for window, kept in ((system + 2 * turn, 1), (system + 2 * turn + 1, 2), (system, 0)):
        raw, tokens = chat_format.make_context(tok, "last?", history=history,
                                               max_window_size=window)
        expected_raw, expected = chat_format.make_context(
            tok, "last?", history=history[len(history) - kept:])
        assert (raw, tokens) == (expected_raw, expected)


def test_decode_broken_utf8_and_bad_id(tok):
    # A lone continuation byte decodes to the replacement character, never raises.
    lone = next(i for i in range(256) if tok.token_bytes(i) == b"\x80")
    assert tok.decode([lone]) == "\ufffd"
    assert tok.decode(tok.encode("ok") + [lone]) == "ok\ufffd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_loader_finds_dir_env_and_reports_bad_files(qwen_tiktoken_path, tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "qwen.tiktoken").symlink_to(qwen_tiktoken_path)
    assert load_tokenizer(ckpt).kind == "qwen"
    assert load_tokenizer(tmp_path).kind == "byte-level fallback"
    monkeypatch.setenv("QWEN_TIKTOKEN", str(qwen_tiktoken_path))
    assert load_tokenizer().kind == "qwen"
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(TokenizerFileError, match="nope.tiktoken"):
        load_tokenizer(missing)
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_text("IQ== 0\nthis is not base64!! x\n")
    with pytest.raises(TokenizerFileError, match="corrupt.tiktoken.*line 2"):
        load_tokenizer(corrupt)
    truncated = tmp_path / "short.tiktoken"
    truncated.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerFileError, match="short.tiktoken.*found 2 tokens"):
        load_tokenizer(truncated)
    monkeypatch.setenv("QWEN_TIKTOKEN", str(missing))
    with pytest.raises(TokenizerFileError, match="nope.tiktoken"):
        load_tokenizer()


def test_pickles_by_path(tok):
    import pickle
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled 你好") == tok.encode("pickled 你好")
