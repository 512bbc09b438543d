"""Qwen v1 tokenizers: the real tiktoken BPE and a byte-level fallback with the same interface.

The Qwen tokenizer reproduces the original `QWenTokenizer` (tokenization_qwen.py): text is NFC
normalised, then encoded by tiktoken with special-token text turned into special ids (the
default) or kept as plain bytes (`allow_special=False`, how `make_context` encodes message
content); decoding replaces broken UTF-8. The byte-level tokenizer lets the CPU demo run on a
machine that has no Qwen vocabulary: ids 0..255 are bytes, then the 208 special tokens.
"""

from __future__ import annotations

import base64
import logging
import os
import pathlib
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

VOCAB_FILENAME = "qwen.tiktoken"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKEN_STRINGS: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205)))
QWEN_NUM_RANKS = 151643  # the original fixes the first special id at this value

_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKEN_STRINGS))


class TokenizerFileError(ValueError):
    """A vocabulary file that was asked for is missing or unreadable."""


def _ids_list(ids) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class _TokenizerBase:
    """Special-token bookkeeping shared by both tokenizers (ids in the original's order)."""

    name: str
    kind: str

    def __init__(self, first_special_id: int):
        self.special_tokens: dict[str, int] = {
            s: first_special_id + i for i, s in enumerate(SPECIAL_TOKEN_STRINGS)}
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}

    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_by_id

    def _check_ids(self, ids: list[int]) -> None:
        n = self.vocab_size
        bad = [i for i in ids if i < 0 or i >= n]
        if bad:
            raise ValueError(f"{self.name}: token id {bad[0]} outside the vocabulary [0, {n})")

    def convert_ids_to_tokens(self, ids) -> list[bytes | str]:
        """Like the original: bytes for ordinary tokens, the token string for special ones."""
        ids = _ids_list(ids)
        self._check_ids(ids)
        return [self._special_by_id.get(i) or self.token_bytes(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """ids -> text; skipping drops every id >= eod_id, as the original does."""
        ids = _ids_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        self._check_ids(ids)
        return self._decode(ids, errors)

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool | Collection[str] = True,
                     num_threads: int = 8) -> list[list[int]]:
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


class QwenTokenizer(_TokenizerBase):
    """The Qwen v1 BPE on tiktoken (151,643 ranks + 208 special tokens, n_vocab 151,851)."""

    kind = "qwen"

    def __init__(self, vocab_file: str | os.PathLike):
        import tiktoken

        self.vocab_file = str(pathlib.Path(vocab_file).resolve())
        ranks = _read_ranks(self.vocab_file)
        super().__init__(len(ranks))
        self.name = f"qwen-tiktoken ({self.vocab_file})"
        self._enc = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens)

    def __reduce__(self):
        # Grain workers rebuild the tokenizer from the file instead of pickling 150k ranks.
        return (QwenTokenizer, (self.vocab_file,))

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str, *, allow_special: bool | Collection[str] = True,
               disallowed_special: str | Collection[str] = ()) -> list[int]:
        """NFC, then tiktoken. `disallowed_special="all"` with `allow_special=False` raises
        ValueError on any special-token text, like the original with those tiktoken arguments."""
        text = unicodedata.normalize("NFC", text)
        allowed = "all" if allow_special is True else (set() if allow_special is False
                                                      else set(allow_special))
        if allowed == set() and not disallowed_special:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed,
                                disallowed_special=disallowed_special)

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool | Collection[str] = True,
                     num_threads: int = 8) -> list[list[int]]:
        """Many texts at once on tiktoken's thread pool (the BPE releases the GIL)."""
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        if allow_special is False:
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        allowed = "all" if allow_special is True else set(allow_special)
        return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special=allowed,
                                      disallowed_special=())

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(token_id))

    def _decode(self, ids: list[int], errors: str) -> str:
        return self._enc.decode(ids, errors=errors)


class ByteTokenizer(_TokenizerBase):
    """Byte-level fallback: ids 0..255 are UTF-8 bytes, specials at 256..463 (vocab 464)."""

    kind = "byte-level fallback"
    name = "byte-level fallback"

    def __init__(self):
        super().__init__(256)

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKEN_STRINGS)

    def encode(self, text: str, *, allow_special: bool | Collection[str] = True,
               disallowed_special: str | Collection[str] = ()) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        allowed = (set(SPECIAL_TOKEN_STRINGS) if allow_special is True
                   else set() if allow_special is False else set(allow_special))
        disallowed = (set(SPECIAL_TOKEN_STRINGS) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        ids: list[int] = []
        start = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.group() in disallowed:
                raise ValueError(f"Encountered text corresponding to disallowed special token "
                                 f"{m.group()!r}")
            if m.group() in allowed:
                ids.extend(text[start:m.start()].encode("utf-8"))
                ids.append(self.special_tokens[m.group()])
                start = m.end()
        ids.extend(text[start:].encode("utf-8"))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if token_id < 256:
            return bytes([token_id])
        return self._special_by_id[token_id].encode("utf-8")

    def _decode(self, ids: list[int], errors: str) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors=errors))
                out.append(self._special_by_id[i])
                run = bytearray()
        out.append(run.decode("utf-8", errors=errors))
        return "".join(out)


def _read_ranks(path: str) -> dict[bytes, int]:
    """Parse `base64-token rank` lines; any defect is one TokenizerFileError naming the file."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise TokenizerFileError(f"cannot read Qwen vocabulary file {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, TypeError) as e:
            raise TokenizerFileError(
                f"corrupt Qwen vocabulary file {path}, line {lineno}: {line[:60]!r} "
                f"is not 'base64-token rank'") from e
    if len(ranks) != QWEN_NUM_RANKS or set(ranks.values()) != set(range(QWEN_NUM_RANKS)):
        raise TokenizerFileError(
            f"corrupt Qwen vocabulary file {path}: expected ranks 0..{QWEN_NUM_RANKS - 1} "
            f"({QWEN_NUM_RANKS} distinct tokens), found {len(ranks)} tokens")
    return ranks


Tokenizer = QwenTokenizer | ByteTokenizer


def load_tokenizer(path_or_dir: str | os.PathLike | None = None, *,
                   fallback: bool = True) -> Tokenizer:
    """Find `qwen.tiktoken` in a checkpoint dir, an explicit file, or $QWEN_TIKTOKEN.

    A file named explicitly (argument or environment) must load, otherwise TokenizerFileError.
    With no vocabulary found, returns the byte-level fallback (and logs a warning) unless
    `fallback=False`.
    """
    if path_or_dir is not None:
        p = pathlib.Path(path_or_dir)
        if p.is_dir():
            if (p / VOCAB_FILENAME).exists():
                return QwenTokenizer(p / VOCAB_FILENAME)
        else:
            return QwenTokenizer(p)  # explicit file: missing/corrupt is an error
    env = os.environ.get("QWEN_TIKTOKEN")
    if env:
        return QwenTokenizer(env)
    if not fallback:
        where = f"in {path_or_dir} " if path_or_dir is not None else ""
        raise TokenizerFileError(f"no {VOCAB_FILENAME} found {where}and QWEN_TIKTOKEN is unset")
    logger.warning("No Qwen vocabulary (%s) found%s and QWEN_TIKTOKEN unset: using the "
                   "byte-level fallback tokenizer (vocab 464); outputs are not Qwen's.",
                   VOCAB_FILENAME, f" in {path_or_dir}" if path_or_dir is not None else "")
    return ByteTokenizer()


def pieces_hex(tokenizer: Tokenizer, ids: Iterable[int]) -> list[str | None]:
    """Hex of each ordinary token's bytes, None for special tokens (the reference layout)."""
    return [None if isinstance(p, str) else p.hex()
            for p in tokenizer.convert_ids_to_tokens(list(ids))]
