"""Grain pipelines for pretraining (packed documents) and SFT (ChatML conversations).

Documents are listed into a `DocumentIndex` (data_sources.py), split train/validation by a hash
of their key, sharded per process (`shard_index::shard_count`), shuffled with the seed (a new
permutation each epoch), tokenised in grain worker processes, then packed and batched here.

Batches are dicts of numpy arrays, all [batch_size, seq_len]:
  inputs, targets (int32), loss_mask (float32), segment_ids (int32), positions (int32).

Pretraining packing. The token stream is `EOS d1 EOS d2 EOS ...`: every document gets its
`<|endoftext|>` appended and the stream starts with one, so each document is preceded by an EOS
that acts as its start token. Windows of seq_len + 1 tokens overlap by one token (stride
seq_len): `inputs = stream[k*L : k*L+L]`, `targets = stream[k*L+1 : k*L+L+1]`, so every token of
every document and its EOS is a target exactly once, and loss_mask is 1 on all of them. An
input EOS starts a new segment: it belongs to the NEXT document (whose first token it
predicts), while the EOS as a target closes the previous one. `segment_ids` count documents in
the window from 1; `positions` restart at 0 at each input EOS and at the window start (a
document continued from the previous window restarts at 0, keeping positions < seq_len; RoPE is
relative, so attention within the window is unchanged). The last window of a finite run is
padded: pad id EOS, segment 0, position 0, loss 0. A partial last batch is padded with such
rows unless `drop_remainder`.

SFT packing. Conversations (cut to seq_len + 1 tokens, counted as truncated) are never split:
each contributes inputs = ids[:-1], targets = ids[1:], loss = mask[1:]; `sft_packing=True`
places whole conversations one after another (one segment each) until the next does not fit,
`False` gives one conversation per row. Padding as above. `loss_mask` ("assistant", or
"release" for the original finetune.py's labels) picks the mask: chat_format's module doc.

Checkpointing: the iterator is a `grain.DatasetIterator`; `get_state()` is a JSON-able dict
(the grain state from just before the partly consumed document, plus the offset into it, the
one carried token and the statistics), so a restored iterator yields exactly the batches an
uninterrupted one would. Use `save_state`/`restore_state` (JSON file), or Orbax through
`orbax_save_args`/`orbax_restore_args` (grain's checkpoint handler).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from qwen_jax.data import chat_format
from qwen_jax.data.sources import (  # noqa: F401  (re-exported: the data API lives here)
    DataError,
    DocumentIndex,
    EncodeConversation,
    TokenizeDocument,
    list_documents,
)

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class DataConfig:
    """What to read and how to cut it. `source`: "stdlib" or paths / directories / globs."""

    source: str | Sequence[str] = "stdlib"
    kind: str = "pretrain"              # "pretrain" or "sft"
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    text_field: str = "text"            # JSONL key holding a pretraining document
    num_workers: int = 0                # grain worker processes; 0 = tokenise in-process
    worker_buffer_size: int = 4
    read_threads: int = 2               # grain read-ahead threads (per worker process)
    read_buffer_size: int = 16          # documents read ahead by those threads
    shard_index: int | None = None      # default jax.process_index()
    shard_count: int | None = None      # default jax.process_count()
    num_epochs: int | None = None       # None = repeat forever (reshuffled each epoch)
    validation_fraction: float = 0.02   # share of documents (by key hash) in "validation"
    stdlib_limit: int | None = None     # first N stdlib files only (tests, quick runs)
    jsonl: bool | None = None           # None: decide by suffix (.jsonl / .ndjson)
    sft_packing: bool = True            # SFT: pack whole conversations (True) or pad (False)
    loss_mask: str = "assistant"        # SFT: "assistant" or "release" (chat_format doc)
    drop_remainder: bool = False        # drop the partial last batch of a finite run


_DOC_STATS = ("documents", "empty_documents", "tokens", "replaced_bytes",
              "truncated_conversations")
_EMIT_STATS = ("examples", "padding_examples", "batches", "target_tokens")


def _ensure_absl_flags() -> None:
    # Grain's worker processes read absl flags; outside an absl app they are never parsed.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(config: DataConfig) -> tuple[int, int]:
    index, count = config.shard_index, config.shard_count
    if index is None or count is None:
        import jax
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise DataError(f"shard_index {index} outside [0, shard_count={count})")
    return index, count


def document_dataset(config: DataConfig, index: DocumentIndex, map_fn) -> grain.IterDataset:
    """Shard, shuffle per epoch, repeat and tokenise (in workers) the documents of `index`."""
    shard_index, shard_count = _shard(config)
    ds = grain.MapDataset.range(len(index))[shard_index::shard_count]
    if len(ds) == 0:
        raise DataError(f"empty dataset: shard {shard_index} of {shard_count} has no documents "
                        f"({len(index)} in all)")
    ds = ds.shuffle(seed=config.seed).repeat(config.num_epochs).map(map_fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                 prefetch_buffer_size=config.read_buffer_size))
    if config.num_workers > 0:
        _ensure_absl_flags()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    return it_ds


class PackedBatchIterator(grain.DatasetIterator):
    """Packs tokenised documents/conversations into fixed-shape batches (see module doc)."""

    def __init__(self, docs: grain.IterDataset, *, mode: str, seq_len: int, batch_size: int,
                 eod_id: int, drop_remainder: bool = False, listing: dict | None = None):
        super().__init__(docs.__iter__())
        if mode not in ("concat", "pack", "pad"):
            raise ValueError(f"unknown packing mode {mode!r}")
        self.mode, self.seq_len, self.batch_size = mode, seq_len, batch_size
        self.eod_id, self.drop_remainder = eod_id, drop_remainder
        self._listing = dict(listing or {})
        self._counts = dict.fromkeys(_DOC_STATS + _EMIT_STATS, 0)
        self._carry = eod_id       # concat: last token of the previous window
        self._pending: dict | None = None
        self._pos = 0
        self._pending_snapshot: tuple[Any, dict] | None = None

    @property
    def stats(self) -> dict[str, int]:
        """Listing counts (files, skipped empty files, ...) plus reading/packing counts."""
        return {**self._listing, **self._counts}

    # -- reading ---------------------------------------------------------------------------
    def _fetch(self) -> bool:
        """Make the next non-empty element pending; False at the end of a finite run."""
        while True:
            snapshot = (self._parent.get_state(), {k: self._counts[k] for k in _DOC_STATS})
            try:
                el = next(self._parent)
            except StopIteration:
                return False
            self._counts["documents"] += 1
            self._counts["replaced_bytes"] += int(el["replaced"])
            self._counts["truncated_conversations"] += int(el["truncated"])
            if int(el["empty"]) or len(el["ids"]) < (1 if self.mode == "concat" else 2):
                self._counts["empty_documents"] += 1
                continue
            self._counts["tokens"] += len(el["ids"])
            self._pending, self._pos, self._pending_snapshot = el, 0, snapshot
            return True

    # -- packing ---------------------------------------------------------------------------
    def _concat_row(self) -> dict | None:
        L = self.seq_len
        buf = np.empty(L + 1, np.int32)
        buf[0], n = self._carry, 1
        while n < L + 1:
            if self._pending is None and not self._fetch():
                break
            ids = self._pending["ids"]
            take = min(L + 1 - n, len(ids) - self._pos)
            buf[n:n + take] = ids[self._pos:self._pos + take]
            n, self._pos = n + take, self._pos + take
            if self._pos == len(ids):
                self._pending = None
        if n == 1:
            return None
        self._carry = int(buf[n - 1])
        inputs, targets = buf[:n - 1], buf[1:n]
        is_start = inputs == self.eod_id
        is_start[0] = True
        idx = np.arange(n - 1)
        return self._row(inputs, targets, np.ones(n - 1, np.float32), np.cumsum(is_start),
                         idx - np.maximum.accumulate(np.where(is_start, idx, 0)))

    def _conversation_row(self) -> dict | None:
        L = self.seq_len
        parts, used = [], 0
        while True:
            if self._pending is None and not self._fetch():
                break
            ids, mask = self._pending["ids"], self._pending["mask"]
            if used + len(ids) - 1 > L and parts:
                break  # keep it pending: it starts the next row
            parts.append((ids[:-1], ids[1:], mask[1:]))
            used += len(ids) - 1
            self._pending = None
            if self.mode == "pad":
                break
        if not parts:
            return None
        return self._row(np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts]),
                         np.concatenate([p[2] for p in parts]).astype(np.float32),
                         np.concatenate([np.full(len(p[0]), s + 1) for s, p in enumerate(parts)]),
                         np.concatenate([np.arange(len(p[0])) for p in parts]))

    def _row(self, inputs, targets, loss, segments, positions, count: bool = True) -> dict:
        """Pad one example to seq_len (pad id EOS, segment 0, position 0, loss 0)."""
        n, L = len(inputs), self.seq_len
        row = {"inputs": np.full(L, self.eod_id, np.int32),
               "targets": np.full(L, self.eod_id, np.int32),
               "loss_mask": np.zeros(L, np.float32),
               "segment_ids": np.zeros(L, np.int32),
               "positions": np.zeros(L, np.int32)}
        for key, value in zip(BATCH_KEYS, (inputs, targets, loss, segments, positions)):
            row[key][:n] = value
        if count:
            self._counts["examples"] += 1
            self._counts["target_tokens"] += int(loss.sum())
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        make_row = self._concat_row if self.mode == "concat" else self._conversation_row
        rows = []
        while len(rows) < self.batch_size:
            row = make_row()
            if row is None:
                break
            rows.append(row)
        if not rows or (self.drop_remainder and len(rows) < self.batch_size):
            raise StopIteration
        while len(rows) < self.batch_size:
            rows.append(self._row(*(np.zeros(0),) * 5, count=False))
            self._counts["padding_examples"] += 1
        self._counts["batches"] += 1
        return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}

    # -- checkpointing ---------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            parent_state, doc_counts = self._pending_snapshot
        else:
            parent_state, doc_counts = self._parent.get_state(), self._counts
        return {"parent": parent_state, "has_pending": self._pending is not None,
                "pending_pos": self._pos, "carry": self._carry,
                "counts": {**{k: self._counts[k] for k in _EMIT_STATS},
                           **{k: doc_counts[k] for k in _DOC_STATS}}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {k: int(state["counts"][k]) for k in _DOC_STATS + _EMIT_STATS}
        self._carry, self._pending, self._pos = int(state["carry"]), None, 0
        if state["has_pending"]:
            if not self._fetch():
                raise DataError("iterator state points past the end of the data")
            self._pos = int(state["pending_pos"])


def make_pretrain_iterator(config: DataConfig, tokenizer, split: str = "train"
                           ) -> PackedBatchIterator:
    """Batches of packed documents from `config.source` (see module doc for the layout)."""
    if config.kind != "pretrain":
        raise DataError(f"make_pretrain_iterator needs kind='pretrain', got {config.kind!r}")
    index = list_documents(config.source, split=split,
                           validation_fraction=config.validation_fraction,
                           stdlib_limit=config.stdlib_limit, jsonl=config.jsonl)
    docs = document_dataset(config, index, TokenizeDocument(index, tokenizer, config.text_field))
    return PackedBatchIterator(docs, mode="concat", seq_len=config.seq_len,
                               batch_size=config.batch_size, eod_id=tokenizer.eod_id,
                               drop_remainder=config.drop_remainder,
                               listing=dataclasses.asdict(index.stats))


def make_sft_iterator(config: DataConfig, tokenizer, split: str = "train"
                      ) -> PackedBatchIterator:
    """Batches of ChatML conversations from JSONL (`messages` or `conversations` layout)."""
    if config.kind != "sft":
        raise DataError(f"make_sft_iterator needs kind='sft', got {config.kind!r}")
    if config.source == "stdlib":
        raise DataError("the stdlib corpus is pretraining text; SFT needs JSONL conversations")
    if config.loss_mask not in chat_format.LOSS_MASKS:
        raise DataError(f"unknown loss_mask {config.loss_mask!r}; expected 'assistant' or "
                        "'release'")
    index = list_documents(config.source, split=split,
                           validation_fraction=config.validation_fraction,
                           jsonl=True if config.jsonl is None else config.jsonl)
    docs = document_dataset(config, index,
                            EncodeConversation(index, tokenizer, config.seq_len + 1,
                                               config.loss_mask))
    return PackedBatchIterator(docs, mode="pack" if config.sft_packing else "pad",
                               seq_len=config.seq_len, batch_size=config.batch_size,
                               eod_id=tokenizer.eod_id, drop_remainder=config.drop_remainder,
                               listing=dataclasses.asdict(index.stats))


def make_iterator(config: DataConfig, tokenizer, split: str = "train") -> PackedBatchIterator:
    make = {"pretrain": make_pretrain_iterator, "sft": make_sft_iterator}.get(config.kind)
    if make is None:
        raise DataError(f"unknown data kind {config.kind!r}; expected 'pretrain' or 'sft'")
    return make(config, tokenizer, split)


def save_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    """Write the iterator state as JSON (atomically: a crash never leaves half a file)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(iterator.get_state()))
    os.replace(tmp, path)


def restore_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
    iterator.set_state(json.loads(pathlib.Path(path).read_text()))


def orbax_save_args(iterator: grain.DatasetIterator):
    """For `ocp.args.Composite(..., data=orbax_save_args(it))` in a CheckpointManager.save."""
    return grain.checkpoint.CheckpointSave(iterator)


def orbax_restore_args(iterator: grain.DatasetIterator):
    """Restores into `iterator` in place (grain's handler calls its set_state)."""
    return grain.checkpoint.CheckpointRestore(iterator)
