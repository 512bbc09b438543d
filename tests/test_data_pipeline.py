"""Pretraining and SFT pipelines: exact packing, masks, determinism, resume, shards, bad input."""

import json

import numpy as np
import pytest

from qwen_jax.data import pipeline as data
from qwen_jax.data.pipeline import DataConfig, DataError
from qwen_jax.data.sources import list_documents, stdlib_root
from qwen_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eod_id


def _docs():
    # Distinct documents of very different lengths (some span several windows).
    return ([f"doc {i}: " + "x" * (i * 7 % 45) + f" end{i}" for i in range(14)]
            + ["ünïcödé 你好 😀 " * 5, "<|endoftext|> is plain text here"])


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, text in enumerate(_docs()):
        (root / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    return root


def _cfg(source, **kw):
    base = dict(source=str(source), seq_len=16, batch_size=3, seed=7, num_epochs=1,
                validation_fraction=0.0, shard_index=0, shard_count=1)
    base.update(kw)
    return DataConfig(**base)


def _all(it):
    return list(it)


def _documents_from_targets(batches):
    """Real targets of the run, concatenated and cut at EOS: the documents read, in order."""
    stream = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in batches]).tolist()
    assert stream[-1] == EOS
    docs, cur = [], []
    for t in stream:
        if t == EOS:
            docs.append(TOK.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_epoch_packs_every_document_once(corpus):
    it = data.make_pretrain_iterator(_cfg(corpus), TOK)
    batches = _all(it)
    got = _documents_from_targets(batches)
    assert sorted(got) == sorted(_docs()) and got != _docs()  # all, once each, shuffled
    for b in batches:
        assert all(b[k].shape == (3, 16) for k in data.BATCH_KEYS)
        assert b["loss_mask"].dtype == np.float32 and b["inputs"].dtype == np.int32
    rows = [{k: b[k][r] for k in data.BATCH_KEYS} for b in batches for r in range(3)]
    real = [r for r in rows if r["loss_mask"].any()]
    for prev, row in zip(real, real[1:]):
        assert row["inputs"][0] == prev["targets"][-1]  # windows overlap by one token
    for row in real:
        n = int(row["loss_mask"].sum())
        assert (row["inputs"][1:n] == row["targets"][:n - 1]).all()
        assert (row["loss_mask"][:n] == 1).all() and (row["segment_ids"][n:] == 0).all()
        seg, pos = 1, 0
        for t in range(n):
            if t > 0 and row["inputs"][t] == EOS:
                seg, pos = seg + 1, 0
            assert (row["segment_ids"][t], row["positions"][t]) == (seg, pos)
            pos += 1
    stats = it.stats
    assert stats["skipped_empty_files"] == 1 and stats["files"] == 17
    assert stats["documents"] == 16 and stats["tokens"] == sum(len(d.encode()) + 1
                                                               for d in _docs())
    assert stats["target_tokens"] == stats["tokens"]
    assert stats["padding_examples"] == 3 * len(batches) - len(real)


def test_window_layout_exact(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("ab")
    (batch,) = _all(data.make_pretrain_iterator(_cfg(tmp_path, seq_len=8, batch_size=1), TOK))
    a, b = ord("a"), ord("b")
    assert batch["inputs"][0].tolist() == [EOS, a, b, EOS, a, b, EOS, EOS]
    assert batch["targets"][0].tolist()[:6] == [a, b, EOS, a, b, EOS]
    assert batch["loss_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 0]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(
        all(np.array_equal(x[k], y[k]) for k in data.BATCH_KEYS) for x, y in zip(xs, ys))


def test_determinism_and_resume_mid_epoch(corpus, tmp_path):
    cfg = _cfg(corpus, num_epochs=None)  # repeating: the run crosses epoch boundaries
    first = _take(data.make_pretrain_iterator(cfg, TOK), 25)
    assert _same(first, _take(data.make_pretrain_iterator(cfg, TOK), 25))
    other = _take(data.make_pretrain_iterator(_cfg(corpus, num_epochs=None, seed=8), TOK), 25)
    assert not _same(first, other)
    for cut in (1, 4, 11):
        it = data.make_pretrain_iterator(cfg, TOK)
        _take(it, cut)
        state = json.dumps(it.get_state())
        stats = it.stats
        restored = data.make_pretrain_iterator(cfg, TOK)
        restored.set_state(json.loads(state))
        assert restored.stats == stats
        assert _same(_take(restored, 25 - cut), first[cut:])
    it = data.make_pretrain_iterator(cfg, TOK)
    _take(it, 6)
    data.save_state(it, tmp_path / "data_state.json")
    restored = data.make_pretrain_iterator(cfg, TOK)
    data.restore_state(restored, tmp_path / "data_state.json")
    assert _same(_take(restored, 5), first[6:11])


def test_orbax_checkpoint_roundtrip(corpus, tmp_path):
    import orbax.checkpoint as ocp
    cfg = _cfg(corpus, num_epochs=None)
    expected = _take(data.make_pretrain_iterator(cfg, TOK), 9)
    it = data.make_pretrain_iterator(cfg, TOK)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=data.orbax_save_args(it)))
        mngr.wait_until_finished()
    restored = data.make_pretrain_iterator(cfg, TOK)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=data.orbax_restore_args(restored)))
    assert _same(_take(restored, 4), expected[5:])


def test_worker_processes_match_in_process(corpus):
    cfg = _cfg(corpus, num_epochs=None)
    expected = _take(data.make_pretrain_iterator(cfg, TOK), 12)
    it = data.make_pretrain_iterator(_cfg(corpus, num_epochs=None, num_workers=2), TOK)
    try:
        assert _same(_take(it, 5), expected[:5])
        state = it.get_state()
        it.set_state(json.loads(json.dumps(state)))
        assert _same(_take(it, 7), expected[5:])
    finally:
        it.close()


def test_shards_disjoint_and_covering(corpus):
    seen = []
    for shard in range(3):
        it = data.make_pretrain_iterator(_cfg(corpus, shard_index=shard, shard_count=3), TOK)
        seen.append(_documents_from_targets(_all(it)))
    assert sorted(sum(seen, [])) == sorted(_docs())
    assert all(len(s) > 0 for s in seen)
    with pytest.raises(DataError, match="shard_index 3 outside"):
        data.make_pretrain_iterator(_cfg(corpus, shard_index=3, shard_count=3), TOK)


def test_stdlib_corpus_split_and_pipeline():
    kw = dict(validation_fraction=0.2, stdlib_limit=150)
    train = list_documents("stdlib", split="train", **kw)
    val = list_documents("stdlib", split="validation", **kw)
    every = list_documents("stdlib", split="all", **kw)
    names = lambda ix: {ix.where(i) for i in range(len(ix))}  # noqa: E731
    assert names(train).isdisjoint(names(val)) and names(train) | names(val) == names(every)
    assert names(train) == names(list_documents("stdlib", split="train", **kw))
    assert 0 < len(val) < len(train)
    assert all(n.startswith(str(stdlib_root())) and "site-packages" not in n
               and "/test/" not in n and n.endswith(".py") for n in names(every))
    it = data.make_pretrain_iterator(DataConfig(seq_len=32, batch_size=2, stdlib_limit=5,
                                                shard_index=0, shard_count=1), TOK)
    batch = next(it)
    assert batch["inputs"].shape == (2, 32) and batch["loss_mask"].all()


def test_jsonl_text_field_and_replaced_bytes(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": "first doc", "id": 1}), "", json.dumps({"body": "second"})]
    path.write_bytes("\n".join(lines).encode() + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    it = data.make_pretrain_iterator(_cfg(tmp_path, text_field="body"), TOK)
    assert sorted(_documents_from_targets(_all(it))) == sorted(
        ["first doc", "second", "ok \ufffd\ufffd bytes"])
    assert it.stats["replaced_bytes"] == 2 and it.stats["skipped_blank_lines"] == 1


def _write_sft(path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "ans"}, {"from": "user", "value": "q2"},
                           {"from": "assistant", "value": "a2"}]},
        {"messages": [{"role": "user", "content": "long " * 40},
                      {"role": "assistant", "content": "cut"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("packing", [True, False])
def test_sft_layouts_masks_and_truncation(tmp_path, packing):
    _write_sft(tmp_path / "chat.jsonl")
    cfg = _cfg(tmp_path, kind="sft", seq_len=160, batch_size=2, sft_packing=packing)
    it = data.make_sft_iterator(cfg, TOK)
    batches = _all(it)
    rows = [{k: b[k][r] for k in data.BATCH_KEYS} for b in batches for r in range(2)]
    replies = sorted(TOK.decode(r["targets"][(r["loss_mask"] == 1) & (r["segment_ids"] == s)])
                     for r in rows for s in range(1, r["segment_ids"].max() + 1))
    # The truncated conversation lost its reply; the two-turn one trains on both replies.
    assert replies == ["", "ans<|im_end|>a2<|im_end|>", "hello<|im_end|>"]
    assert it.stats["truncated_conversations"] == 1 and it.stats["documents"] == 3
    # 64 + 61 target tokens share one packed row; the cut conversation fills its own.
    real = [r for r in rows if r["segment_ids"].any()]
    assert len(real) == (2 if packing else 3)
    assert max(r["segment_ids"].max() for r in real) == (2 if packing else 1)
    for r in rows:
        for s in range(1, r["segment_ids"].max() + 1):
            inputs, targets = (r[k][r["segment_ids"] == s] for k in ("inputs", "targets"))
            assert (inputs[1:] == targets[:-1]).all()
            assert r["positions"][r["segment_ids"] == s].tolist() == list(range(len(inputs)))
            assert inputs[0] == TOK.im_start_id  # each conversation starts its own segment
        assert (r["loss_mask"][r["segment_ids"] == 0] == 0).all()


def test_bad_inputs_raise_clear_errors(tmp_path):
    def make(name, content, **kw):
        d = tmp_path / name
        d.mkdir()
        (d / "f.jsonl").write_text(content)
        return data.make_iterator(_cfg(d, **kw), TOK)

    with pytest.raises(DataError, match=r"f\.jsonl:2: malformed JSON"):
        _all(make("malformed", '{"text": "ok"}\n{"text": oops}\n'))
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing text field 'text'.*'body'"):
        _all(make("missing", '{"body": "no text key"}\n'))
    with pytest.raises(DataError, match=r"f\.jsonl:1: turn 1: unknown role 'robot'"):
        _all(make("role", json.dumps({"conversations": [{"from": "human", "value": "a"},
                                                       {"from": "robot", "value": "b"}]}),
                  kind="sft"))
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing 'messages' or 'conversations'"):
        _all(make("layout", '{"text": "not a chat"}\n', kind="sft"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty dataset.*1 files, 1 empty"):
        data.make_pretrain_iterator(_cfg(empty), TOK)
    with pytest.raises(DataError, match="does not exist"):
        data.make_pretrain_iterator(_cfg(tmp_path / "nowhere"), TOK)
    with pytest.raises(DataError, match="matches no files"):
        data.make_pretrain_iterator(_cfg(tmp_path / "*.nothing"), TOK)
    with pytest.raises(DataError, match="SFT needs JSONL conversations"):
        data.make_iterator(DataConfig(source="stdlib", kind="sft"), TOK)
    with pytest.raises(DataError, match="unknown data kind 'rl'"):
        data.make_iterator(_cfg(empty, kind="rl"), TOK)
