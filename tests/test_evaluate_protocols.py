"""`python -m qwen_jax.evaluate`: the release's MMLU, GSM8K and HumanEval protocols against
line-by-line transcriptions of the release's eval/ scripts (run with transformers on our
qwen2 export of the same weights) on hand-made data in each data set's layout: the same prompt
tokens, predictions and score. HumanEval's code runs in the sandbox: solutions that loop,
allocate 4 GB, open a socket or write outside their folder are failures and the run goes on.
Bad input is one line and exit status 1."""

import contextlib
import csv
import io
import json
import re

import numpy as np
import pytest

from scaled_weights import scaled_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SUBJECTS = ("high_school_physics", "world_religions")


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen_tiktoken_path):
    """(checkpoint, transformers model, transformers tokenizer, engine) of a 2-layer model
    with the Qwen vocabulary at O(1) weight scale."""
    import convert_hf
    from qwen_jax import QwenConfig, save_checkpoint
    from qwen_jax.evaluate.engine import Engine

    config = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16,
                        num_hidden_layers=2, intermediate_size=256, vocab_size=151936,
                        seq_length=1024, max_position_embeddings=2048, dtype="float32",
                        param_dtype="float32")
    params = scaled_params(config, seed=1)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 3.0
    root = tmp_path_factory.mktemp("protocols")
    ckpt = save_checkpoint(root / "ckpt", params, config, tokenizer_file=qwen_tiktoken_path)
    assert convert_hf.main(["export", str(ckpt), str(root / "hf"), "--format", "qwen2"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "hf"))
    return ckpt, hf, tokenizer, Engine(ckpt, batch_tokens=4096, generation_batch_size=8)


def _words(rng, n):
    words = "atom force charge wave heat light prayer temple scripture ritual moon".split()
    return " ".join(rng.choice(words, n))


@pytest.fixture(scope="module")
def mmlu_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmlu")
    rng = np.random.default_rng(0)
    for split, n in (("dev", 5), ("test", 3)):
        (root / split).mkdir()
        for subject in SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(
                    [_words(rng, int(rng.integers(3, 30))), *[_words(rng, 2) for _ in range(4)],
                     "ABCD"[int(rng.integers(4))]] for _ in range(n))
    return root


# ---------------------------------------------------------------- the release, transcribed
def release_mmlu(hf, tokenizer, data, subject, max_seq_len=2048):
    """eval/evaluate_mmlu.py's format_example, generate_few_shot_prompt, get_logits and
    eval_subject (batch size 1), as written there."""
    import pandas as pd

    choices = ["A", "B", "C", "D"]

    def format_example(line, include_answer=True):
        example = "Question: " + line["question"]
        for choice in choices:
            example += f'\n{choice}. {line[f"{choice}"]}'
        if include_answer:
            example += "\nAnswer: " + line["answer"] + "\n\n"
        else:
            example += "\nAnswer:"
        return example

    def generate_few_shot_prompt(k, subject, dev_df):
        def format_subject(subject):
            s = ""
            for entry in subject.split("_"):
                s += " " + entry
            return s.strip()
        prompt = "The following are multiple choice questions (with answers) about {}.\n\n" \
            .format(format_subject(subject))
        for i in range(k):
            prompt += format_example(dev_df.iloc[i, :], include_answer=True)
        return prompt

    names = ["question", "A", "B", "C", "D", "answer"]
    dev_df = pd.read_csv(data / "dev" / f"{subject}_dev.csv", names=names).astype(str)
    test_df = pd.read_csv(data / "test" / f"{subject}_test.csv", names=names).astype(str)
    few_shot_prompt = generate_few_shot_prompt(5, subject, dev_df)
    choices_ids = torch.tensor(tokenizer(" A")["input_ids"] + tokenizer(" B")["input_ids"]
                               + tokenizer(" C")["input_ids"] + tokenizer(" D")["input_ids"]
                               ).unsqueeze(0)
    out = []
    with torch.no_grad():
        for row in test_df.to_dict(orient="records"):
            input_ids = torch.tensor(
                tokenizer([few_shot_prompt + format_example(row, include_answer=False)])[
                    "input_ids"])
            if input_ids.shape[1] > max_seq_len:
                input_ids = input_ids[:, input_ids.shape[1] - max_seq_len + 1:]
            logits = hf(input_ids)["logits"][:, -1, :]
            probs = torch.nn.functional.softmax(logits, dim=-1)
            softval = probs.gather(1, choices_ids.expand(1, -1)).softmax(1)
            pred = {0: "A", 1: "B", 2: "C", 3: "D"}[int(np.argmax(softval[0].numpy()))]
            out.append((input_ids[0].tolist(), pred, int(pred == row["answer"])))
    return out


def release_ceval(hf, tokenizer, data, subject):
    """eval/evaluate_ceval.py's format_example, generate_few_shot_prompt, get_logits and
    eval_subject (batch size 1), as written there; returns per-question (ids, pred) and the
    subject's correct_ratio."""
    import pandas as pd

    choices = ["A", "B", "C", "D"]

    def format_example(line, include_answer=True):
        example = "问题：" + line["question"]
        for choice in choices:
            example += f'\n{choice}. {line[f"{choice}"]}'
        if include_answer:
            example += "\n答案：" + line["answer"] + "\n\n"
        else:
            example += "\n答案："
        return example

    def generate_few_shot_prompt(k, subject, dev_df):
        prompt = ""
        for i in range(k):
            prompt += format_example(dev_df.iloc[i, :], include_answer=True)
        return prompt

    dev_df = pd.read_csv(data / "dev" / f"{subject}_dev.csv")
    val_df = pd.read_csv(data / "val" / f"{subject}_val.csv")
    few_shot_prompt = generate_few_shot_prompt(5, subject, dev_df)
    choices_ids = torch.tensor(tokenizer("A")["input_ids"] + tokenizer("B")["input_ids"]
                               + tokenizer("C")["input_ids"] + tokenizer("D")["input_ids"]
                               ).unsqueeze(0)
    out, score = [], []
    with torch.no_grad():
        for row in val_df.to_dict(orient="records"):
            input_ids = torch.tensor(tokenizer([few_shot_prompt + format_example(
                row, include_answer=False)])["input_ids"])
            logits = torch.nn.functional.softmax(hf(input_ids)["logits"][:, -1, :], dim=-1)
            softval = logits.gather(1, choices_ids.expand(1, -1)).softmax(1)
            pred = {0: "A", 1: "B", 2: "C", 3: "D"}[int(np.argmax(softval[0].numpy()))]
            score.append(1 if pred == row["answer"] else 0)
            out.append((input_ids[0].tolist(), pred))
    return out, 100 * sum(score) / len(score)


def release_gsm8k_answers(completion, answer):
    """eval/evaluate_gsm8k.py's extract_answer_hf, extract_answer and is_correct."""
    ans_re = re.compile(r"#### (\-?[0-9\.\,]+)")
    invalid = "[invalid]"

    def extract_answer_hf(completion):
        match = ans_re.search(completion)
        if match:
            return eval(match.group(1).strip().replace(",", ""))
        return invalid

    def extract_answer(completion):
        try:
            return eval(re.findall(r"\d+", completion)[-1])
        except Exception:
            return invalid

    return extract_answer(completion), extract_answer_hf(answer), \
        extract_answer(completion) == extract_answer_hf(answer)


def release_generate(hf, tokenizer, text, stops, max_new_tokens):
    """generate_sample + decode of evaluate_gsm8k.py / evaluate_humaneval.py: greedy, the
    whole sequence decoded with special tokens as text, then cut at each stop in turn."""
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=151643, eos_token_id=151643)
    sent = tokenizer.decode(out[0].tolist()[len(ids):])
    for stop in stops:
        sent = sent.split(stop)[0]
    return ids, sent


# ---------------------------------------------------------------- the checks
def test_mmlu_is_the_release_protocol(model, mmlu_data):
    from qwen_jax.evaluate import protocols

    ckpt, hf, tokenizer, engine = model
    score = protocols.run_mmlu(engine, mmlu_data)
    release = [r for s in SUBJECTS for r in release_mmlu(hf, tokenizer, mmlu_data, s)]
    assert [d["prompt_ids"] for d in score.details] == [r[0] for r in release]
    assert [d["pred"] for d in score.details] == [r[1] for r in release]
    assert score.value == sum(r[2] for r in release) / len(release)


def test_mmlu_cuts_a_long_prompt_as_the_release_does(model, mmlu_data):
    """The release keeps the last max_seq_len - 1 tokens of a longer prompt (2047 of 2048
    there; at 64 here, so that the prompts are long)."""
    from qwen_jax.evaluate import protocols

    _, hf, tokenizer, engine = model
    score = protocols.run_mmlu(engine, mmlu_data, limit=2, max_tokens=64)
    release = release_mmlu(hf, tokenizer, mmlu_data, SUBJECTS[0], max_seq_len=64)[:2]
    assert [len(d["prompt_ids"]) for d in score.details[:2]] == [63, 63]
    assert [d["prompt_ids"] for d in score.details[:2]] == [r[0] for r in release]
    assert [d["pred"] for d in score.details[:2]] == [r[1] for r in release]


def test_ceval_is_the_release_protocol(model, tmp_path):
    """Macro average over subjects, and the hard subset (college_physics is one of the
    release's 8 hard subjects, tax_accountant is not)."""
    from qwen_jax.evaluate import protocols

    _, hf, tokenizer, engine = model
    rng = np.random.default_rng(3)
    zh = "电路 能量 税务 会计 物理 力学 分子 反应".split()
    subjects = {"college_physics": 4, "tax_accountant": 2}
    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
        for subject, n in subjects.items():
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"]
                           + (["explanation"] if split == "dev" else []))
                for i in range(5 if split == "dev" else n):
                    w.writerow([i, "".join(rng.choice(zh, int(rng.integers(3, 12)))),
                                *["".join(rng.choice(zh, 2)) for _ in range(4)],
                                "ABCD"[int(rng.integers(4))]]
                               + (["因为"] if split == "dev" else []))
    score = protocols.run_ceval(engine, tmp_path)
    release, ratios = [], {}
    for subject in sorted(subjects):
        rows, ratios[subject] = release_ceval(hf, tokenizer, tmp_path, subject)
        release += rows
    assert [d["prompt_ids"] for d in score.details] == [r[0] for r in release]
    assert [d["pred"] for d in score.details] == [r[1] for r in release]
    assert 100 * score.value == pytest.approx(sum(ratios.values()) / len(ratios))
    assert 100 * score.groups["hard"] == pytest.approx(ratios["college_physics"])


def test_gsm8k_is_the_release_protocol(model, tmp_path):
    from qwen_jax.evaluate import protocols

    _, hf, tokenizer, engine = model
    rng = np.random.default_rng(2)
    shots = "".join(f"Question: {_words(rng, 8)}?\nLet's think step by step\n"
                    f"{_words(rng, 6)} 3 + 4 = 7.\nThe answer is 7\n\n" for _ in range(8))
    (tmp_path / "gsm8k_prompt.txt").write_text(shots)
    rows = [{"question": _words(rng, int(rng.integers(4, 14))) + "?",
             "answer": f"{_words(rng, 5)}\n#### {a}"} for a in ("7", "1,024", "-3", "12")]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score = protocols.run_gsm8k(engine, tmp_path, max_new_tokens=24)
    for row, d in zip(rows, score.details):
        text = shots + "\nQuestion: " + row["question"] + "\nLet's think step by step\n"
        ids, completion = release_generate(hf, tokenizer, text, protocols.GSM8K_STOPS, 24)
        assert d["prompt_ids"] == ids and d["completion"] == completion
        pred, gold, correct = release_gsm8k_answers(completion, row["answer"])
        assert (d["pred"], d["gold"], d["correct"]) == (pred, gold, correct)
    for completion in ("so 1,000 and then 42.", "none", "007", "3.5 is 12", "x 0"):
        for answer in ("#### 42", "#### 1,000", "#### 3.5", "#### -7"):
            pred, gold, correct = release_gsm8k_answers(completion, answer)
            assert (protocols.gsm8k_prediction(completion), protocols.gsm8k_gold(answer),
                    protocols.gsm8k_prediction(completion) == protocols.gsm8k_gold(answer)) \
                == (pred, gold, correct)


def test_humaneval_generations_are_the_release_protocol(model):
    from qwen_jax.evaluate import protocols

    _, hf, tokenizer, engine = model
    problems = protocols.humaneval_problems()
    assert len(problems) == 164
    score = protocols.run_humaneval(engine, limit=3, max_new_tokens=16)
    for p, d in zip(problems, score.details):
        ids, completion = release_generate(hf, tokenizer, p["prompt"],
                                           protocols.HUMANEVAL_STOPS, 16)
        assert d["prompt_ids"] == ids and d["completion"] == completion
        assert d["result"] in ("ok", "error", "timeout")


class _FixedCompletions:
    """An engine stand-in that 'generates' given completions (the sandbox is what is tested)."""

    def __init__(self, completions):
        from qwen_jax.data.tokenizer import ByteTokenizer

        self.tokenizer, self.completions = ByteTokenizer(), completions

    def generate_ids(self, requests, progress=None):
        return [self.tokenizer.encode(c) for c in self.completions[:len(requests)]]


def test_humaneval_scores_escapes_as_failures_and_goes_on(tmp_path):
    from qwen_jax.evaluate import protocols

    completions = {
        "passes": "    return 1\n",
        "loops": "    while True:\n        pass\n",
        "allocates": "    x = bytearray(4 * 2**30)\n    return 1\n",
        "connects": "    import socket\n    socket.create_connection(('1.1.1.1', 53), 3)\n"
                    "    return 1\n",
        "writes_outside": "    open('/escape.txt', 'w').write('x')\n    return 1\n",
        "also_passes": "    return 2 - 1\n",
    }
    problems = [{"task_id": f"t/{i}", "prompt": "def f():\n", "entry_point": "f",
                 "test": "def check(candidate):\n    assert candidate() == 1\n"}
                for i in range(len(completions))]
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    score = protocols.run_humaneval(_FixedCompletions(list(completions.values())), path,
                                    timeout=3)
    assert [d["result"] for d in score.details] == ["ok", "timeout", "error", "error", "error",
                                                   "ok"]
    assert score.value == pytest.approx(2 / 6)
    assert [d["completion"] for d in score.details] == list(completions.values())


def run_main(*args):
    from qwen_jax.evaluate.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def test_the_command_prints_a_table_2_row_and_json(tmp_path, capsys, monkeypatch):
    """`python -m qwen_jax.evaluate --task gsm8k` (a small byte-level model): a markdown row
    in Table 2's style, and every example in --json."""
    from qwen_jax import QwenConfig, init_params, save_checkpoint
    from qwen_jax.evaluate.__main__ import main

    import jax

    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)
    config = QwenConfig(hidden_size=32, num_attention_heads=2, kv_channels=16,
                        num_hidden_layers=1, intermediate_size=64, vocab_size=512,
                        seq_length=512, dtype="float32", param_dtype="float32")
    ckpt = save_checkpoint(tmp_path / "tiny", init_params(config, jax.random.PRNGKey(0)),
                           config)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "gsm8k_prompt.txt").write_text("Question: 1 + 1?\nThe answer is 2\n")
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"{i} + 1?", "answer": f"so\n#### {i + 1}"}) + "\n"
        for i in range(3)))
    assert main(["--checkpoint", str(ckpt), "--task", "gsm8k", "--data",
                 str(tmp_path / "gsm8k"), "--max-new-tokens", "8", "--json",
                 str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "| model | GSM8K 8-shot |" in out and "| tiny |" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["count"] == 3 and len(saved["examples"]) == 3
    assert [e["gold"] for e in saved["examples"]] == [1, 2, 3]


def test_bad_input_is_one_line(model, mmlu_data, tmp_path):
    import shutil

    ckpt = model[0]
    missing_subject = tmp_path / "mmlu"
    shutil.copytree(mmlu_data, missing_subject)
    (missing_subject / "dev" / f"{SUBJECTS[1]}_dev.csv").unlink()
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    (gsm8k / "gsm8k_prompt.txt").write_text("Question: 1?\nThe answer is 1\n\n")
    (gsm8k / "test.jsonl").write_text(json.dumps({"question": "2?"}) + "\n")
    broken = tmp_path / "broken_ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "config.json").write_text("{not json")
    cases = [
        (["--task", "mmlu", "--data", missing_subject], f"no {SUBJECTS[1]}_dev.csv"),
        (["--task", "gsm8k", "--data", gsm8k], "has no 'answer' field"),
        (["--task", "mmlu", "--data", tmp_path / "nowhere"], "no such file or folder"),
        (["--task", "mmlu"], "needs --data"),
        (["--task", "triviaqa"], "expected one of"),
        (["--task", "lm-eval:no_such_task"], "unknown lm-eval task"),
    ]
    for args, expected in cases:
        code, err = run_main("--checkpoint", ckpt, *args)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expected in lines[0], (args, err)
    code, err = run_main("--checkpoint", broken, "--task", "mmlu", "--data", mmlu_data)
    assert code == 1 and err.strip().startswith("error:") and "config.json" in err, err
