"""Document sources for the data pipelines: listing, train/validation split, reading, decoding.

A corpus is listed once in the main process into a compact `DocumentIndex` (one row per
document: a whole text file, or one JSONL line found by its byte offset), so grain can shuffle
and shard documents by index and workers read only what they tokenise. Every input problem
becomes one `DataError` naming the file, line and key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import re
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from qwen_jax.data import chat_format

JSONL_SUFFIXES = (".jsonl", ".ndjson")
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Conversation role names of the common SFT layouts -> ChatML roles.
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant"}
_SURROGATE_RE = re.compile("[\udc80-\udcff]")


class DataError(ValueError):
    """Unusable input data; the message names the file, line and key at fault."""


@dataclass
class ListingStats:
    files: int = 0
    skipped_empty_files: int = 0
    skipped_blank_lines: int = 0
    documents_listed: int = 0


@dataclass
class DocumentIndex:
    """Documents of one split: file paths plus per-document (file, byte offset, line)."""

    paths: list[str]
    is_jsonl: list[bool]
    file_idx: np.ndarray  # int32 [n]
    offset: np.ndarray    # int64 [n], -1 = the whole file is one document
    line: np.ndarray      # int64 [n], 1-based JSONL line (0 for whole files)
    stats: ListingStats = field(default_factory=ListingStats)

    def __len__(self) -> int:
        return len(self.file_idx)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        return int(self.file_idx[i]), int(self.offset[i]), int(self.line[i])

    def where(self, i: int) -> str:
        f, _, line = self[i]
        return f"{self.paths[f]}:{line}" if line else self.paths[f]


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def _stdlib_files(limit: int | None) -> list[tuple[str, str]]:
    """(absolute path, key) of the interpreter's own .py sources, in a fixed order."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = pathlib.Path(dirpath, name)
                found.append((str(path), path.relative_to(root).as_posix()))
    return found[:limit] if limit else found


def _expand(source: str) -> list[tuple[str, str]]:
    """(path, key) for a file, a directory (recursive, hidden names skipped) or a glob."""
    if any(c in source for c in "*?["):
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"glob {source!r} matches no files")
        return [(p, p) for p in paths]
    p = pathlib.Path(source)
    if p.is_file():
        return [(str(p), p.name)]
    if p.is_dir():
        out = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    f = pathlib.Path(dirpath, name)
                    out.append((str(f), f.relative_to(p).as_posix()))
        return out
    raise DataError(f"data source {source!r} does not exist")


def in_validation(key: str, fraction: float) -> bool:
    """Stable split: a document's key hashes to [0, 1); below `fraction` is validation."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                       digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


def list_documents(source: str | list[str], *, split: str = "train",
                   validation_fraction: float = 0.02, stdlib_limit: int | None = None,
                   jsonl: bool | None = None) -> DocumentIndex:
    """List the documents of `split` ("train", "validation" or "all").

    `source` is "stdlib" (the running Python's standard library sources) or paths, directories
    and globs. `jsonl=None` decides per file by suffix (.jsonl/.ndjson: one document per line).
    """
    if split not in ("train", "validation", "all"):
        raise DataError(f"unknown split {split!r}; expected 'train', 'validation' or 'all'")
    if source == "stdlib":
        files = _stdlib_files(stdlib_limit)
    else:
        files = [f for s in ([source] if isinstance(source, (str, os.PathLike)) else source)
                 for f in _expand(str(s))]
    stats = ListingStats()
    paths, is_jsonl, rows = [], [], []

    def keep(key: str) -> bool:
        return split == "all" or in_validation(key, validation_fraction) == (
            split == "validation")

    for path, key in files:
        stats.files += 1
        if os.path.getsize(path) == 0:
            stats.skipped_empty_files += 1
            continue
        as_jsonl = path.endswith(JSONL_SUFFIXES) if jsonl is None else jsonl
        f = len(paths)
        paths.append(path)
        is_jsonl.append(as_jsonl)
        if not as_jsonl:
            if keep(key):
                rows.append((f, -1, 0))
            continue
        offset = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    if keep(f"{key}:{lineno}"):
                        rows.append((f, offset, lineno))
                else:
                    stats.skipped_blank_lines += 1
                offset += len(raw)
    arr = np.asarray(rows, np.int64).reshape(-1, 3)
    stats.documents_listed = len(arr)
    if not len(arr):
        raise DataError(f"empty dataset: {split!r} split of {source!r} has no documents "
                        f"({stats.files} files, {stats.skipped_empty_files} empty)")
    return DocumentIndex(paths, is_jsonl, arr[:, 0].astype(np.int32), arr[:, 1], arr[:, 2],
                         stats)


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 decode; each undecodable byte becomes U+FFFD and is counted."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
        return _SURROGATE_RE.subn("\ufffd", text)


def read_record(index: DocumentIndex, i: int) -> tuple[str | dict, int]:
    """(text or parsed JSON object, replaced bytes) of document i."""
    f, offset, line = index[i]
    path = index.paths[f]
    with open(path, "rb") as fh:
        if offset < 0:
            data = fh.read()
            if b"\x00" in data:
                raise DataError(f"{path}: binary data (a NUL byte at offset "
                                f"{data.index(0)}); expected a UTF-8 text file")
            return decode_counting(data)
        fh.seek(offset)
        text, replaced = decode_counting(fh.readline())
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: malformed JSON line ({e.msg} at column {e.colno})"
                        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
    return record, replaced


def document_text(index: DocumentIndex, i: int, text_field: str) -> tuple[str, int]:
    record, replaced = read_record(index, i)
    if isinstance(record, str):
        return record, replaced
    if text_field not in record:
        raise DataError(f"{index.where(i)}: missing text field {text_field!r} "
                        f"(keys: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{index.where(i)}: text field {text_field!r} is "
                        f"{type(text).__name__}, not a string")
    return text, replaced


def conversation_messages(index: DocumentIndex, i: int) -> tuple[list[dict], int]:
    """Normalise {"messages": [{role, content}]} or {"conversations": [{from, value}]}."""
    record, replaced = read_record(index, i)
    where = index.where(i)
    if isinstance(record, str):
        raise DataError(f"{where}: SFT data must be JSONL conversations")
    if "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise DataError(f"{where}: missing 'messages' or 'conversations' (keys: {sorted(record)})")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: the conversation must be a non-empty list")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(f"{where}: turn {t} must have {role_key!r} and {text_key!r}")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{where}: turn {t}: unknown role {turn[role_key]!r} in key "
                            f"{role_key!r}; expected one of {sorted(ROLE_ALIASES)}")
        messages.append({"role": role, "content": turn[text_key]})
    return messages, replaced


class TokenizeDocument:
    """Grain map: document index -> its ids + EOS (special-token text stays plain text)."""

    def __init__(self, index: DocumentIndex, tokenizer, text_field: str = "text"):
        self.index, self.tokenizer, self.text_field = index, tokenizer, text_field

    def __call__(self, i: int) -> dict:
        text, replaced = document_text(self.index, i, self.text_field)
        # Empty documents yield no tokens (not a lone EOS); the packer skips and counts them.
        ids = (self.tokenizer.encode(text, allow_special=False) + [self.tokenizer.eod_id]
               if text else [])
        return {"ids": np.asarray(ids, np.int32), "replaced": replaced, "truncated": 0,
                "empty": int(not text)}


class EncodeConversation:
    """Grain map: conversation index -> ChatML ids and loss mask, cut to `max_len` tokens.
    `loss_mask`: "assistant" or "release" (`chat_format.encode_conversation`)."""

    def __init__(self, index: DocumentIndex, tokenizer, max_len: int,
                 loss_mask: str = "assistant"):
        self.index, self.tokenizer, self.max_len = index, tokenizer, max_len
        self.loss_mask = loss_mask

    def __call__(self, i: int) -> dict:
        messages, replaced = conversation_messages(self.index, i)
        try:
            conv = chat_format.encode_conversation(self.tokenizer, messages, self.max_len,
                                                   loss_mask=self.loss_mask)
        except ValueError as e:
            raise DataError(f"{self.index.where(i)}: {e}") from None
        return {"ids": conv.ids, "mask": conv.loss_mask, "replaced": replaced,
                "truncated": int(conv.truncated), "empty": 0}
