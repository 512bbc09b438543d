"""Preference pairs and prompts for the reward model, DPO and PPO.

Preference sources (`config.data.source`, comma-separated JSONL files, or `toy:digits`):
  - `{"prompt", "chosen", "rejected"}`: plain text (the response follows the prompt as is and
    ends with `<|endoftext|>`), or ChatML: `prompt` a message list, `chosen` / `rejected` the
    assistant's reply (a string or a one-message list), ending with `<|im_end|>`;
  - the Anthropic HH layout `{"chosen", "rejected"}`: whole dialogues
    "\\n\\nHuman: ... \\n\\nAssistant: ...", the last assistant turn being the response and the
    shared turns before it the prompt, converted to ChatML;
  - an optional `margin` (float) per pair, added to the pairwise loss.
A response lacking its end token gets one; a pair too long for `seq_len` keeps its prompt and
cuts the response (the end token stays last). Identical chosen and rejected, an empty
response or a prompt that leaves no room for a response are errors naming the file and line.

`toy:digits` is a task with a known preference, generated from the seed: short prompts and two
random replies over letters, digits and spaces, the one with more digits preferred. A reward
model must learn to count; a policy can raise its reward by writing digits.

Batches are dicts of numpy arrays, right padded to `seq_len`: for each side s in (chosen,
rejected) `s_tokens` (prompt + response), `s_segments` (1 real, 0 padding) and `s_response`
(1 on response tokens), and `margin` [B]. Iterators keep a JSON state (epoch, position) for
checkpoints; the order is a seeded shuffle per epoch, the same for any process count.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import NamedTuple

import numpy as np

from qwen_jax.data.chat_format import encode_conversation
from qwen_jax.data.pipeline import DataError

TOY_DIGITS = "toy:digits"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class Pair(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float
    where: str = ""  # file:line of a pair read from a file


# ------------------------------------------------------------------------------ parsing
def _chatml_prompt(tokenizer, messages) -> list[int]:
    ids = encode_conversation(tokenizer, messages).ids.tolist()
    return ids + tokenizer.encode("\n") + [tokenizer.im_start_id] + \
        tokenizer.encode("assistant", allow_special=False) + tokenizer.encode("\n")


def _reply(tokenizer, value, end: int, where: str, key: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != \
                "assistant" or not isinstance(value[0].get("content"), str):
            raise DataError(f"{where}: '{key}' must be a string or one assistant message")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    ids = tokenizer.encode(value, allow_special=False)
    if not ids:
        raise DataError(f"{where}: empty '{key}' response")
    return ids + [end]


def _hh_messages(text: str, where: str, key: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: '{key}' is not an HH dialogue (\\n\\nHuman: ... "
                        "\\n\\nAssistant: ...)")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def parse_pair(record, tokenizer, where: str) -> Pair:
    """One JSON record -> token ids (see the module doc for the layouts)."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: expected an object with 'chosen' and 'rejected'")
    margin = record.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" not in record:  # HH: the shared turns are the prompt, the last reply differs
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be HH "
                            "dialogue strings")
        c, r = _hh_messages(chosen, where, "chosen"), _hh_messages(rejected, where, "rejected")
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[:-1] != r[:-1]:
            raise DataError(f"{where}: HH 'chosen' and 'rejected' must share every turn but "
                            "the last, an Assistant reply")
        record = {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}
        chosen, rejected = record["chosen"], record["rejected"]
    prompt = record["prompt"]
    if isinstance(prompt, list):
        try:
            prompt_ids = _chatml_prompt(tokenizer, prompt)
        except ValueError as e:
            raise DataError(f"{where}: 'prompt': {e}") from None
        end = tokenizer.im_end_id
    elif isinstance(prompt, str):
        prompt_ids, end = tokenizer.encode(prompt, allow_special=False), tokenizer.eod_id
    else:
        raise DataError(f"{where}: 'prompt' must be a string or a message list")
    c = _reply(tokenizer, chosen, end, where, "chosen")
    r = _reply(tokenizer, rejected, end, where, "rejected")
    if c == r:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return Pair(prompt_ids, c, r, float(margin), where)


def jsonl_records(paths, what: str):
    """(file:line, record) of every non-blank line of the JSONL files `paths`."""
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such {what} file")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def read_pairs(paths, tokenizer) -> list[Pair]:
    pairs = [parse_pair(record, tokenizer, where)
             for where, record in jsonl_records(paths, "preference")]
    if not pairs:
        raise DataError(f"{','.join(map(str, paths))}: no preference pairs")
    return pairs


# ------------------------------------------------------------------------------ the toy task
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def toy_prompt(rng) -> str:
    return "say " + "".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 7)))) + ":"


def toy_digits_pairs(count: int, seed: int, tokenizer) -> list[Pair]:
    """Pairs of random replies (letters, digits and spaces, 6-16 characters); the reply with
    more digits is chosen. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        prompt = toy_prompt(rng)
        replies = []
        for _ in range(2):
            n, p_digit = int(rng.integers(6, 17)), float(rng.uniform(0.0, 0.8))
            chars = [str(rng.integers(10)) if rng.random() < p_digit else
                     rng.choice(list(_LETTERS + "  ")) for _ in range(n)]
            replies.append("".join(chars))
        digits = [sum(ch.isdigit() for ch in s) for s in replies]
        if digits[0] == digits[1]:
            continue
        chosen, rejected = (replies[0], replies[1]) if digits[0] > digits[1] else \
            (replies[1], replies[0])
        pairs.append(Pair(tokenizer.encode(prompt, allow_special=False),
                          tokenizer.encode(chosen, allow_special=False) + [tokenizer.eod_id],
                          tokenizer.encode(rejected, allow_special=False) + [tokenizer.eod_id],
                          0.0))
    return pairs


def digit_fraction(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


# ------------------------------------------------------------------------------ batching
def fit(prompt: list[int], response: list[int], seq_len: int) -> list[int] | None:
    """The response cut to fit seq_len after the prompt (its end token kept last); None when
    the prompt leaves no room for a response."""
    room = seq_len - len(prompt)
    if room < 2:
        return None
    return response if len(response) <= room else response[:room - 1] + response[-1:]


def pack_side(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """[(prompt, response)] -> right-padded tokens, segments and response masks [B, seq_len]."""
    b = len(rows)
    tokens = np.full((b, seq_len), pad_id, np.int32)
    segments = np.zeros((b, seq_len), np.int32)
    response = np.zeros((b, seq_len), np.int32)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        tokens[i, :n] = p + r
        segments[i, :n] = 1
        response[i, len(p):n] = 1
    return {"tokens": tokens, "segments": segments, "response": response}


def pair_batch(pairs: list[Pair], seq_len: int, pad_id: int) -> dict:
    out = {"margin": np.asarray([p.margin for p in pairs], np.float32)}
    for side in ("chosen", "rejected"):
        rows = [(p.prompt, getattr(p, side)) for p in pairs]
        out.update({f"{side}_{k}": v for k, v in pack_side(rows, seq_len, pad_id).items()})
    return out


class Epochs:
    """Indices into n items: epochs of a seeded shuffle (or in order), walked with a JSON
    state {"epoch", "position"}; `epochs` None = without end. Each epoch's order is drawn
    once."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, epochs: int | None = None):
        self.n, self.seed, self.shuffle, self.epochs = n, seed, shuffle, epochs
        self.epoch = self.position = 0
        self._order = (None, None)  # (epoch, its order)

    def order(self) -> np.ndarray:
        if self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
                     if self.shuffle else np.arange(self.n))
            self._order = (self.epoch, order)
        return self._order[1]

    def take(self, k: int) -> list[int]:
        """The next k indices, crossing into the next epoch; fewer (maybe none) when the last
        epoch ends."""
        out: list[int] = []
        while len(out) < k:
            if self.position >= self.n:
                if self.epochs is not None and self.epoch + 1 >= self.epochs:
                    break
                self.epoch, self.position = self.epoch + 1, 0
            count = min(k - len(out), self.n - self.position)
            out += self.order()[self.position:self.position + count].tolist()
            self.position += count
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class PairIterator:
    """Global batches of pairs: epochs of a seeded shuffle (train), or one pass in order
    (eval, `epochs=1`). State: {"epoch", "position"}."""

    def __init__(self, pairs: list[Pair], batch_size: int, seq_len: int, pad_id: int,
                 seed: int, shuffle: bool = True, epochs: int | None = None):
        self.pairs, self.batch_size, self.seq_len, self.pad_id = pairs, batch_size, seq_len, \
            pad_id
        self.walk = Epochs(len(pairs), seed, shuffle, epochs)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        chosen = [self.pairs[i] for i in self.walk.take(self.batch_size)]
        if not chosen:
            raise StopIteration
        valid = np.ones(self.batch_size, np.float32)
        valid[len(chosen):] = 0  # a last eval batch padded with copies, weighted 0
        chosen += [chosen[-1]] * (self.batch_size - len(chosen))
        batch = pair_batch(chosen, self.seq_len, self.pad_id)
        batch["valid"] = valid
        return batch

    def get_state(self) -> dict:
        return self.walk.get_state()

    def set_state(self, state: dict) -> None:
        self.walk.set_state(state)


def check_pairs(pairs: list[Pair], seq_len: int, what: str) -> list[Pair]:
    """Responses cut to fit; a prompt that leaves no room is an error."""
    out = []
    for i, p in enumerate(pairs):
        c, r = fit(p.prompt, p.chosen, seq_len), fit(p.prompt, p.rejected, seq_len)
        where = p.where or f"{what}: pair {i}"
        if c is None or r is None:
            raise DataError(f"{where}: the prompt has {len(p.prompt)} tokens, which "
                            f"leaves no room for a response in seq_len={seq_len}")
        if c == r:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical once cut "
                            f"to seq_len={seq_len}")
        out.append(p._replace(chosen=c, rejected=r))
    return out


def load_splits(source: str, tokenizer, seq_len: int, seed: int, eval_source: str = "",
                toy_size: int = 4096) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs, each file read once: files, or `toy:digits` (the eval split drawn
    with another seed). Without an eval_source, a file source holds out every 20th pair."""
    def read(src: str, split: str) -> list[Pair]:
        if src == TOY_DIGITS:
            size = toy_size if split == "train" else max(256, toy_size // 16)
            return toy_digits_pairs(size, seed + (0 if split == "train" else 7919), tokenizer)
        return read_pairs([s for s in src.split(",") if s], tokenizer)

    train = read(source, "train")
    if eval_source or source == TOY_DIGITS:
        evals = read(eval_source or source, "eval")
    else:
        evals = [p for i, p in enumerate(train) if i % 20 == 19]
        train = [p for i, p in enumerate(train) if i % 20 != 19]
        if not evals:
            raise DataError(f"{source}: too few pairs to hold out an eval split (every 20th); "
                            "give config.data.eval_source")
    return check_pairs(train, seq_len, source), check_pairs(evals, seq_len,
                                                            eval_source or source)


def load_pairs(source: str, tokenizer, seq_len: int, split: str, seed: int,
               eval_source: str = "", toy_size: int = 4096) -> list[Pair]:
    """The pairs of one split ("train" or "eval") of `load_splits`."""
    train, evals = load_splits(source, tokenizer, seq_len, seed, eval_source, toy_size)
    return train if split == "train" else evals


# ------------------------------------------------------------------------------ PPO prompts
def read_prompts(paths, tokenizer) -> list[list[int]]:
    """JSONL `{"prompt": text | message list}` -> ids (a message list becomes a ChatML prompt
    ending in `<|im_start|>assistant\\n`)."""
    prompts = []
    for where, record in jsonl_records(paths, "prompt"):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, list):
            try:
                prompts.append(_chatml_prompt(tokenizer, prompt))
            except ValueError as e:
                raise DataError(f"{where}: 'prompt': {e}") from None
        elif isinstance(prompt, str) and prompt:
            prompts.append(tokenizer.encode(prompt, allow_special=False))
        else:
            raise DataError(f"{where}: expected {{\"prompt\": text or messages}}")
    if not prompts:
        raise DataError(f"{','.join(map(str, paths))}: no prompts")
    return prompts


class PromptIterator:
    """Batches of prompts (lists of ids), epochs of a seeded shuffle; JSON state."""

    def __init__(self, prompts: list[list[int]], batch_size: int, seed: int):
        self.prompts, self.batch_size = prompts, batch_size
        self.walk = Epochs(len(prompts), seed)

    def __next__(self) -> list[list[int]]:
        return [self.prompts[i] for i in self.walk.take(self.batch_size)]

    def get_state(self) -> dict:
        return self.walk.get_state()

    def set_state(self, state: dict) -> None:
        self.walk.set_state(state)


def load_prompts(source: str, tokenizer, seq_len: int, seed: int,
                 toy_size: int = 4096) -> list[list[int]]:
    if source == TOY_DIGITS:
        rng = np.random.default_rng(seed)
        prompts = [tokenizer.encode(toy_prompt(rng), allow_special=False)
                   for _ in range(toy_size)]
    else:
        prompts = read_prompts([s for s in source.split(",") if s], tokenizer)
    for i, p in enumerate(prompts):
        if len(p) >= seq_len:
            raise DataError(f"{source}: prompt {i} has {len(p)} tokens, which leaves no room "
                            f"for a response in seq_len={seq_len}")
    return prompts

