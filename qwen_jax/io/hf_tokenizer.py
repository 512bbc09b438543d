"""The Qwen v1 vocabulary as Hugging Face `tokenizers` / `transformers` files.

`write_hf_tokenizer` turns `qwen.tiktoken` into a `tokenizer.json` and `tokenizer_config.json`
that `transformers.AutoTokenizer.from_pretrained(dir)` loads without remote code and that give
the ids of our `QwenTokenizer` (special-token text becomes special ids, the default):

- normalizer NFC, as `QwenTokenizer.encode` normalises before tiktoken;
- pre-tokenizer: a Split on the tiktoken pattern `PAT_STR` (each match its own piece), then
  ByteLevel without prefix space and without its own regex, which maps every byte to the
  printable character GPT-2's byte-to-unicode table gives it;
- model: byte-level BPE. The vocabulary is every tiktoken token (mapped byte by byte) with its
  rank as id. tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest
  rank; the equivalent merge list holds one merge per multi-byte token, ordered by that token's
  rank: the two parts that tiktoken's own BPE leaves when it runs on the token's bytes and stops
  just before the token's rank. `ignore_merges` makes a piece that is itself a token encode to
  that token directly, as tiktoken does;
- the 208 special tokens as added tokens with their tiktoken ids. They are `normalized`, i.e.
  matched in the NFC text as `QwenTokenizer` matches them (a combining mark after `>` composes
  with it and the special token is then not there);
- decoder ByteLevel (bytes back to text, broken UTF-8 replaced); no post-processor, so nothing is
  added around the ids.

`tokenizers` normalises with older Unicode tables than Python's `unicodedata`: text holding one
of the about one hundred combining marks added since Unicode 10 (rare Arabic, Indic and historic
script marks), in an order that canonical reordering changes, normalises and so encodes
differently.

`tokenizer_config.json` names the native fast tokenizer class, `<|endoftext|>` as eos and (by
default) pad (the released generation configs' eos_token_id and pad_token_id), `<|im_start|>` and
`<|im_end|>` as additional special tokens, and `CHAT_TEMPLATE`.

`CHAT_TEMPLATE` lays out messages as `make_context` and `encode_conversation` do: the default
system prompt when the first message is not a system message, `<|im_start|>{role}\\n{content}
<|im_end|>` per message, joined by `\\n`, and `\\n<|im_start|>assistant\\n` as the generation
prompt. The template renders text that is then tokenized as a whole, so its ids equal
`make_context`'s except where that function's piecewise encoding differs: message content that
contains special-token text (`make_context` keeps it as plain bytes) or starts with white space
that holds a line break (the whole-text encoding may join it with the `\\n` before it).
History truncation to `max_window_size` is left to the caller.
"""

from __future__ import annotations

import json
import os
import pathlib

from qwen_jax.data.chat_format import DEFAULT_SYSTEM
from qwen_jax.data.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAT_STR,
    SPECIAL_TOKEN_STRINGS,
    _read_ranks,
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _jinja_str(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


CHAT_TEMPLATE = "\n".join([
    "{%- if not messages or messages[0]['role'] != 'system' %}",
    "  {{- " + _jinja_str(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}") + " }}",
    "  {%- if messages %}{{- '\\n' }}{%- endif %}",
    "{%- endif %}",
    "{%- for message in messages %}",
    "  {%- if not loop.first %}{{- '\\n' }}{%- endif %}",
    "  {{- " + _jinja_str(IM_START) + " + message['role'] + '\\n' + message['content'] + "
    + _jinja_str(IM_END) + " }}",
    "{%- endfor %}",
    "{%- if add_generation_prompt %}",
    "  {{- " + _jinja_str(f"\n{IM_START}assistant\n") + " }}",
    "{%- endif %}",
])


def _byte_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte value)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _bpe_final_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes using only merges of rank below `rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """Byte-level BPE vocabulary and merges (ordered by the merged token's rank)."""
    byte_char = _byte_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[int, list[str]]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) < 2:
            continue
        parts = _bpe_final_pair(token, rank, ranks)
        if len(parts) == 2:
            merges.append((rank, [to_str(parts[0]), to_str(parts[1])]))
    merges.sort(key=lambda m: m[0])
    return vocab, [pair for _, pair in merges]


def _tokenizer_json(ranks: dict[bytes, int]) -> dict:
    vocab, merges = _vocab_and_merges(ranks)
    first_special = len(ranks)
    added = [{"id": first_special + i, "content": s, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": True, "special": True}
             for i, s in enumerate(SPECIAL_TOKEN_STRINGS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def _tokenizer_config(model_max_length: int, pad_token: str = ENDOFTEXT) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": pad_token,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_hf_tokenizer(tiktoken_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       model_max_length: int = 8192, pad_token: str = ENDOFTEXT) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for `qwen.tiktoken` into `out_dir`;
    `pad_token` (one of the special tokens) is what transformers pads with.

    Raises ValueError naming the file when `tiktoken_path` is missing or malformed; then
    nothing is written. Each file is written under a temporary name and renamed once all are
    complete. Returns the written file names.
    """
    if pad_token not in SPECIAL_TOKEN_STRINGS:
        raise ValueError(f"pad_token {pad_token!r} is not one of the special tokens")
    ranks = _read_ranks(str(pathlib.Path(tiktoken_path)))
    contents = {
        TOKENIZER_FILE: _tokenizer_json(ranks),
        CONFIG_FILE: _tokenizer_config(model_max_length, pad_token),
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for name, obj in contents.items():
            tmp = temps[name] = str(out / f".{name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=None if name == TOKENIZER_FILE else 2)
                f.write("\n")
        for name, tmp in temps.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return list(contents)
