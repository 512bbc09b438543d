"""Preference pairs (qwen_jax/align/data.py): the three record layouts, their errors, the cut
to seq_len, batch layout, the pair iterator's order and state, and the toy task."""

import json

import numpy as np
import pytest

from qwen_jax.align import data as align_data
from qwen_jax.align.data import Pair, PairIterator, check_pairs, pair_batch, parse_pair
from qwen_jax.data.chat_format import encode_conversation
from qwen_jax.data.pipeline import DataError
from qwen_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOD, IM_START, IM_END = TOK.eod_id, TOK.im_start_id, TOK.im_end_id
WHERE = "prefs.jsonl:7"


def b(text):
    """Plain bytes of `text` (what the byte tokenizer gives for non-special text)."""
    return list(text.encode("utf-8"))


# ------------------------------------------------------------------------------ parse_pair
def test_plain_text_pair():
    pair = parse_pair({"prompt": "2+2=", "chosen": "4", "rejected": "five"}, TOK, WHERE)
    assert pair.prompt == b("2+2=")
    assert pair.chosen == b("4") + [EOD]
    assert pair.rejected == b("five") + [EOD]
    assert pair.margin == 0.0
    assert isinstance(pair.margin, float)


def test_plain_text_keeps_special_token_text_as_bytes():
    """A user cannot inject structure: `<|endoftext|>` written in the data is plain text."""
    pair = parse_pair({"prompt": "a<|endoftext|>", "chosen": "x<|im_end|>", "rejected": "y"},
                      TOK, WHERE)
    assert pair.prompt == b("a<|endoftext|>")
    assert pair.chosen == b("x<|im_end|>") + [EOD]
    assert EOD not in pair.prompt and pair.chosen.count(EOD) == 1


def test_margin_field():
    pair = parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}, TOK, WHERE)
    assert pair.margin == 2.0 and isinstance(pair.margin, float)
    pair = parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -0.5}, TOK,
                      WHERE)
    assert pair.margin == -0.5
    batch = pair_batch([pair, pair._replace(margin=1.25)], 8, EOD)
    np.testing.assert_array_equal(batch["margin"], np.asarray([-0.5, 1.25], np.float32))
    for bad in ("1.0", True, None):
        with pytest.raises(DataError, match=f"{WHERE}: 'margin' must be a number"):
            parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "margin": bad}, TOK,
                       WHERE)


def chatml_prompt_by_hand(turns):
    """<|im_start|>system\\n...<|im_end|>\\n<|im_start|>role\\ncontent<|im_end|>... then
    \\n<|im_start|>assistant\\n, built from the byte tokenizer piece by piece."""
    ids = [IM_START] + b("system\nYou are a helpful assistant.") + [IM_END]
    for role, content in turns:
        ids += b("\n") + [IM_START] + b(f"{role}\n{content}") + [IM_END]
    return ids + b("\n") + [IM_START] + b("assistant\n")


def test_chatml_message_list_prompt():
    record = {"prompt": [{"role": "user", "content": "Hi there"}],
              "chosen": "Hello!", "rejected": [{"role": "assistant", "content": "Go away."}]}
    pair = parse_pair(record, TOK, WHERE)
    assert pair.prompt == chatml_prompt_by_hand([("user", "Hi there")])
    assert pair.prompt[-len(b("assistant\n")) - 1:] == [IM_START] + b("assistant\n")
    assert pair.chosen == b("Hello!") + [IM_END]
    assert pair.rejected == b("Go away.") + [IM_END]
    assert EOD not in pair.prompt + pair.chosen + pair.rejected


def test_chatml_with_own_system_message():
    record = {"prompt": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Q"}],
              "chosen": "A", "rejected": "B"}
    pair = parse_pair(record, TOK, WHERE)
    want = ([IM_START] + b("system\nBe brief.") + [IM_END] + b("\n") + [IM_START]
            + b("user\nQ") + [IM_END] + b("\n") + [IM_START] + b("assistant\n"))
    assert pair.prompt == want


def test_anthropic_hh_layout():
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?"
    record = {"chosen": shared + "\n\nAssistant: Six.",
              "rejected": shared + "\n\nAssistant: I don't know."}
    pair = parse_pair(record, TOK, WHERE)
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And 3+3?"}]
    want_prompt = (encode_conversation(TOK, messages).ids.tolist() + TOK.encode("\n")
                   + [IM_START] + TOK.encode("assistant") + TOK.encode("\n"))
    assert pair.prompt == want_prompt
    # and the same as built piece by piece (the shared turns, then the assistant header)
    assert pair.prompt == chatml_prompt_by_hand([("user", "What is 2+2?"),
                                                 ("assistant", "Four."),
                                                 ("user", "And 3+3?")])
    assert pair.chosen == b("Six.") + [IM_END]
    assert pair.rejected == b("I don't know.") + [IM_END]
    assert pair.margin == 0.0


def test_hh_with_margin():
    record = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "margin": 0.75,
              "rejected": "\n\nHuman: hi\n\nAssistant: bye"}
    pair = parse_pair(record, TOK, WHERE)
    assert pair.margin == 0.75
    assert pair.prompt == chatml_prompt_by_hand([("user", "hi")])
    assert pair.chosen == b("hello") + [IM_END]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "x"},
     "identical"),
    ({"prompt": "p", "chosen": "", "rejected": "no"}, "empty 'chosen'"),
    ({"prompt": "p", "chosen": "yes", "rejected": ""}, "empty 'rejected'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "share every turn but the last"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more",
      "rejected": "\n\nHuman: a\n\nAssistant: y\n\nHuman: more"},
     "share every turn but the last"),  # the last turn is not an Assistant reply
    ({"chosen": "no dialogue here", "rejected": "nor here"}, "not an HH dialogue"),
    ({"prompt": "p", "chosen": "a"}, "expected an object with 'chosen' and 'rejected'"),
    ({"prompt": "p", "rejected": "a"}, "expected an object with 'chosen' and 'rejected'"),
    (["p", "a", "b"], "expected an object"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
     "unknown role"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "one assistant message"),
])
def test_parse_errors_name_the_place(record, message):
    with pytest.raises(DataError) as info:
        parse_pair(record, TOK, WHERE)
    text = str(info.value)
    assert text.startswith(WHERE + ":"), text
    assert message in text, text


# ------------------------------------------------------------------------------ read_pairs
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_pairs_mixed_layouts(tmp_path):
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"},
            "",  # blank lines are skipped
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": "d",
             "margin": 1.5},
            {"chosen": "\n\nHuman: h\n\nAssistant: e", "rejected": "\n\nHuman: h\n\nAssistant: f"}]
    one = write_jsonl(tmp_path / "one.jsonl", rows)
    two = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "p2", "chosen": "g", "rejected": "h"}])
    pairs = align_data.read_pairs([one, two], TOK)
    assert len(pairs) == 4
    assert pairs[0].where.endswith("one.jsonl:1") and pairs[3].where.endswith("two.jsonl:1")
    pairs = [p._replace(where="") for p in pairs]
    assert pairs[0] == Pair(b("p1"), b("a") + [EOD], b("b") + [EOD], 0.0)
    assert pairs[1] == Pair(chatml_prompt_by_hand([("user", "q")]), b("c") + [IM_END],
                            b("d") + [IM_END], 1.5)
    assert pairs[2] == Pair(chatml_prompt_by_hand([("user", "h")]), b("e") + [IM_END],
                            b("f") + [IM_END], 0.0)
    assert pairs[3] == Pair(b("p2"), b("g") + [EOD], b("h") + [EOD], 0.0)


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', "not valid JSON"),
    ({"prompt": "p", "chosen": "dup", "rejected": "dup"}, "identical"),
    ({"prompt": "p", "chosen": "", "rejected": "x"}, "empty 'chosen' response"),
    ({"prompt": "p", "chosen": "x"}, "'chosen' and 'rejected'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "share every turn"),
])
def test_read_pairs_errors_name_file_and_line(tmp_path, bad, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    # line 1, 2 good, line 3 blank, line 4 good, line 5 bad: the line counts blank lines too
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, "", good, bad, good])
    with pytest.raises(DataError) as info:
        align_data.read_pairs([path], TOK)
    assert str(info.value).startswith(f"{path}:5: "), str(info.value)
    assert message in str(info.value)


def test_read_pairs_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such preference file"):
        align_data.read_pairs([tmp_path / "nope.jsonl"], TOK)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no preference pairs"):
        align_data.read_pairs([tmp_path / "empty.jsonl"], TOK)


# ------------------------------------------------------------------------------ check_pairs
def test_check_pairs_cuts_a_long_response_keeping_its_end_token():
    prompt = b("prompt")  # 6 tokens
    long = b("abcdefghijklmnopqrstuvwxyz") + [EOD]
    short = b("xy") + [EOD]
    (cut,) = check_pairs([Pair(prompt, long, short, 0.5)], 16, "src")
    assert cut.prompt == prompt and cut.margin == 0.5
    assert len(cut.prompt) + len(cut.chosen) == 16
    assert cut.chosen == b("abcdefghi") + [EOD]  # 10 = 16 - 6 tokens, the end token last
    assert cut.rejected == short  # fits: unchanged
    # exactly fitting is not cut
    (same,) = check_pairs([Pair(prompt, b("abcdefghi") + [EOD], short, 0.0)], 16, "src")
    assert same.chosen == b("abcdefghi") + [EOD]
    # ChatML: the <|im_end|> stays last
    (chat,) = check_pairs([Pair(prompt, b("0123456789") + [IM_END], short, 0.0)], 9, "src")
    assert chat.chosen == b("01") + [IM_END]


def test_check_pairs_prompt_without_room_is_an_error():
    prompt = b("a long prompt")  # 13 tokens
    pair = Pair(prompt, b("yes") + [EOD], b("no") + [EOD], 0.0)
    assert check_pairs([pair], 15, "src")[0].chosen == b("y") + [EOD]  # room 2: one + end
    for seq_len in (14, 13, 10):  # room 1, 0, negative
        with pytest.raises(DataError, match=f"no room for a response in seq_len={seq_len}"):
            check_pairs([pair], seq_len, "src")


def test_check_pairs_identical_once_cut_is_an_error():
    pair = Pair(b("p"), b("abcX") + [EOD], b("abcY") + [EOD], 0.0)
    with pytest.raises(DataError, match="identical once cut"):
        check_pairs([pair], 5, "src")  # both become "abc" + end


def test_load_pairs_too_long_prompt_names_file_and_line(tmp_path):
    """The module doc: "a prompt that leaves no room for a response [is an error] naming the
    file and line". Line 25 of the file is the 24th training pair (line 20 is held out)."""
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(40)]
    rows[24] = {"prompt": "x" * 40, "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as info:
        align_data.load_pairs(str(path), TOK, 16, "train", 0)
    assert "seq_len=16" in str(info.value)
    assert f"{path}:25" in str(info.value), str(info.value)


def test_load_pairs_holds_out_every_20th(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(45)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    train = align_data.load_pairs(str(path), TOK, 32, "train", 0)
    evals = align_data.load_pairs(str(path), TOK, 32, "eval", 0)
    assert [p.prompt for p in evals] == [b("p19"), b("p39")]
    assert len(train) == 43 and b("p19") not in [p.prompt for p in train]
    with pytest.raises(DataError, match="too few pairs"):
        align_data.load_pairs(str(write_jsonl(tmp_path / "few.jsonl", rows[:5])), TOK, 32,
                              "eval", 0)


# ------------------------------------------------------------------------------ batches
def test_pair_batch_layout():
    pairs = [Pair([1, 2, 3], [10, 11, EOD], [20, EOD], 0.0),
             Pair([4], [12, 13, 14, 15, EOD], [21, 22, EOD], 1.0)]
    batch = pair_batch(pairs, 8, EOD)
    P = EOD
    np.testing.assert_array_equal(batch["chosen_tokens"],
                                  [[1, 2, 3, 10, 11, EOD, P, P], [4, 12, 13, 14, 15, EOD, P, P]])
    np.testing.assert_array_equal(batch["chosen_segments"],
                                  [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["chosen_response"],
                                  [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_tokens"],
                                  [[1, 2, 3, 20, EOD, P, P, P], [4, 21, 22, EOD, P, P, P, P]])
    np.testing.assert_array_equal(batch["rejected_segments"],
                                  [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["rejected_response"],
                                  [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["margin"], [0.0, 1.0])
    for k in batch:
        if k != "margin":
            assert batch[k].shape == (2, 8) and batch[k].dtype == np.int32, k
    assert batch["margin"].dtype == np.float32
    # another pad id pads with it
    other = pair_batch(pairs, 8, 0)
    assert other["chosen_tokens"][0, -1] == 0 and other["chosen_tokens"][0, 5] == EOD


def numbered_pairs(n):
    """Pairs whose prompt is their index (one token), to read the order back."""
    return [Pair([i], [100 + i % 50, EOD], [200, EOD], float(i)) for i in range(n)]


def order_of(batch):
    return batch["chosen_tokens"][:, 0].tolist()


def test_pair_iterator_order_is_seeded_and_epochs_are_permutations():
    pairs = numbered_pairs(10)
    a = PairIterator(pairs, 5, 8, EOD, seed=3)
    b_ = PairIterator(pairs, 5, 8, EOD, seed=3)
    c = PairIterator(pairs, 5, 8, EOD, seed=4)
    seq_a = [order_of(next(a)) for _ in range(6)]  # 3 epochs
    seq_b = [order_of(next(b_)) for _ in range(6)]
    seq_c = [order_of(next(c)) for _ in range(6)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    epochs = [seq_a[0] + seq_a[1], seq_a[2] + seq_a[3], seq_a[4] + seq_a[5]]
    for e in epochs:
        assert sorted(e) == list(range(10))  # each epoch sees every pair once
    assert epochs[0] != list(range(10))  # shuffled
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled each epoch
    assert a.get_state() == {"epoch": 2, "position": 10}


def test_pair_iterator_batches_span_epochs():
    pairs = numbered_pairs(7)
    it = PairIterator(pairs, 4, 8, EOD, seed=0)
    seen = [i for _ in range(7) for i in order_of(next(it))]  # 4 epochs of 7
    for e in range(4):
        assert sorted(seen[7 * e:7 * e + 7]) == list(range(7))
    assert next(it)["valid"].tolist() == [1.0] * 4  # training batches are always full


def test_pair_iterator_state_resumes_the_same_batch():
    pairs = numbered_pairs(9)
    it = PairIterator(pairs, 4, 8, EOD, seed=11)
    for _ in range(3):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives JSON (checkpoint metadata)
    want = [next(it) for _ in range(4)]
    fresh = PairIterator(pairs, 4, 8, EOD, seed=11)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(4)]
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)
    # a fresh iterator without the state would give another batch
    assert order_of(next(PairIterator(pairs, 4, 8, EOD, seed=11))) != order_of(want[0])


def test_eval_iterator_covers_every_pair_once():
    pairs = numbered_pairs(11)
    it = PairIterator(pairs, 4, 8, EOD, seed=5, shuffle=False, epochs=1)
    batches = list(it)
    assert len(batches) == 3
    seen = []
    for batch in batches:
        valid = batch["valid"]
        assert valid.dtype == np.float32 and valid.shape == (4,)
        seen += [p for p, v in zip(order_of(batch), valid) if v == 1.0]
    assert seen == list(range(11))  # in order, each once
    np.testing.assert_array_equal(batches[-1]["valid"], [1, 1, 1, 0])
    assert all(b["valid"].all() for b in batches[:-1])
    # the padded row is a real pair (finite in any model), only weighted out
    assert batches[-1]["chosen_segments"][3].sum() > 0
    with pytest.raises(StopIteration):
        next(it)
    # an exact multiple: no padded batch, no empty batch
    exact = list(PairIterator(numbered_pairs(8), 4, 8, EOD, seed=0, shuffle=False, epochs=1))
    assert len(exact) == 2 and all(b["valid"].all() for b in exact)


# ------------------------------------------------------------------------------ toy task
def test_toy_digits_pairs():
    pairs = align_data.toy_digits_pairs(200, 7, TOK)
    assert len(pairs) == 200
    digits = lambda ids: sum(48 <= t <= 57 for t in ids)
    for p in pairs:
        assert digits(p.chosen) > digits(p.rejected)
        assert p.chosen[-1] == EOD and p.rejected[-1] == EOD
        assert EOD not in p.chosen[:-1] + p.rejected[:-1] + p.prompt
        assert 6 <= len(p.chosen) - 1 <= 16 and 6 <= len(p.rejected) - 1 <= 16
        text = TOK.decode(p.prompt)
        assert text.startswith("say ") and text.endswith(":")
        assert p.margin == 0.0
    again = align_data.toy_digits_pairs(200, 7, TOK)
    assert again == pairs
    other = align_data.toy_digits_pairs(200, 8, TOK)
    assert other != pairs
    # the preferred side is not always the first generated: chosen is sometimes shorter
    assert any(len(p.chosen) < len(p.rejected) for p in pairs)
    assert any(len(p.chosen) > len(p.rejected) for p in pairs)


def test_toy_split_eval_differs_from_train():
    train = align_data.load_pairs("toy:digits", TOK, 32, "train", 0, toy_size=512)
    evals = align_data.load_pairs("toy:digits", TOK, 32, "eval", 0, toy_size=512)
    assert len(train) == 512 and len(evals) == 256
    assert train[:len(evals)] != evals
    for p in train + evals:
        assert len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 32
