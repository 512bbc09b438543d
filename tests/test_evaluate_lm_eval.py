"""The lm-evaluation-harness backend `qwen_jax` against lm-eval's own `hf` backend on the same
weights (our --format qwen2 export, loaded by transformers), on local YAML tasks with local
JSONL data: a multiple-choice task, a rolling perplexity task and a generate_until task. Also:
the stock `lm_eval` command finds the backend; one device and 8 give the same results; a task
of 200 requests compiles a handful of programs; bad model arguments are one-line errors."""

import contextlib
import io
import json
import os
import re
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import runs
from scaled_weights import scaled_params

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

WORDS = ("river stone light garden window paper music winter orange silver forest bridge "
         "candle mountain letter yellow ocean market engine cloud").split()
TASKS = {
    "qj_mc": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\n\
C. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "qj_ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "qj_gen": """
output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n\\n", "Q:", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _documents(task: str, rng) -> list[dict]:
    def words(n):
        return " ".join(rng.choice(WORDS, n))

    if task == "qj_mc":
        return [{"question": words(int(rng.integers(4, 20))),
                 "choices": [words(int(rng.integers(1, 4))) for _ in range(4)],
                 "answer": int(rng.integers(4))} for _ in range(8)]
    if task == "qj_ppl":  # one document longer than the 256-token windows
        return [{"text": words(n).capitalize() + "."} for n in (3, 40, 300)]
    return [{"question": words(int(rng.integers(3, 12))), "answer": words(2)}
            for _ in range(4)]


def write_tasks(folder: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for task, body in TASKS.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in _documents(task, rng)))
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n" + body)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen_tiktoken_path):
    """(checkpoint, export, tasks): a small model with the Qwen vocabulary at O(1) weight
    scale (logits of std ~3: no near-ties in greedy choices), its qwen2 export, the tasks."""
    import convert_hf
    from qwen_jax import QwenConfig, save_checkpoint

    config = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16,
                        num_hidden_layers=2, intermediate_size=256, vocab_size=151936,
                        seq_length=256, max_position_embeddings=512, dtype="float32",
                        param_dtype="float32")
    params = scaled_params(config)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 3.0
    root = tmp_path_factory.mktemp("lm_eval_model")
    ckpt = save_checkpoint(root / "ckpt", params, config, tokenizer_file=qwen_tiktoken_path)
    code = convert_hf.main(["export", str(ckpt), str(root / "hf"), "--format", "qwen2"])
    assert code == 0
    return ckpt, root / "hf", write_tasks(root / "tasks")


def evaluate(model_name, model_args, tasks_dir, tasks=tuple(TASKS), **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model_name, model_args=model_args, tasks=list(tasks),
                                   task_manager=TaskManager(include_path=str(tasks_dir),
                                                            include_defaults=False),
                                   log_samples=True, **kw)


def responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_results_match_the_hf_backend(model):
    """Per request: log-likelihoods within 1e-4 (relative past 100 nats), the same greedy
    flags, the same generations; the same metrics. (One test: both backends evaluate once.)"""
    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    ckpt, hf, tasks = model
    theirs = evaluate("hf", f"pretrained={hf},dtype=float32,max_length=256", tasks,
                      batch_size=4, device="cpu")
    ours = evaluate(QwenJaxLM(checkpoint=str(ckpt), batch_tokens=2048), None, tasks)
    for task in ("qj_mc", "qj_ppl"):
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) > 0
        for doc_a, doc_b in zip(a, b):
            for (mine,), (other,) in zip(doc_a, doc_b):
                if task == "qj_mc":  # (log-likelihood, greedy)
                    assert mine[1] == other[1]
                    mine, other = mine[0], other[0]
                assert abs(float(mine) - float(other)) <= 1e-4 * max(1.0, abs(other) / 100), \
                    (task, mine, other)
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), metric
    a, b = responses(ours, "qj_gen"), responses(theirs, "qj_gen")
    assert a == b and any(text[0] for text in a), (a, b)
    assert ours["results"]["qj_gen"] == theirs["results"]["qj_gen"]


def test_single_token_choices_share_one_forward(model):
    """MMLU's letters: 4 one-token answers to one question are one row, not 4."""
    from lm_eval.api.instance import Instance

    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    lm = QwenJaxLM(checkpoint=str(model[0]), mesh="1:1:1")

    requests = [Instance("loglikelihood", {}, ("Answer:", f" {c}"), 0) for c in "ABCD"]
    rows = lm.engine._rows([lm._encode_pair(*r.args) for r in requests])
    assert len(rows) == 1 and len(rows[0].choices) == 4
    one_by_one = [lm.loglikelihood([r])[0] for r in requests]
    together = lm.loglikelihood(requests)
    np.testing.assert_allclose([x for x, _ in together], [x for x, _ in one_by_one], atol=1e-5)


def byte_model(folder, monkeypatch, seed=0, seq_length=1024):
    """A small model with the byte-level tokenizer (no vocabulary file)."""
    from qwen_jax import QwenConfig, init_params, save_checkpoint

    import jax

    monkeypatch.delenv("QWEN_TIKTOKEN", raising=False)
    config = QwenConfig(hidden_size=32, num_attention_heads=2, kv_channels=16,
                        num_hidden_layers=1, intermediate_size=64, vocab_size=512,
                        seq_length=seq_length, dtype="float32", param_dtype="float32")
    return save_checkpoint(folder, init_params(config, jax.random.PRNGKey(seed)), config)


def test_one_device_gives_what_eight_give(tmp_path, monkeypatch):
    """Scores and greedy generations on 1 device equal those on 8 (the model sharded over
    fsdp, each batch split over 8)."""
    from qwen_jax.evaluate.engine import Engine, GenerationRequest

    ckpt = byte_model(tmp_path / "ckpt", monkeypatch, seq_length=256)
    rng = np.random.default_rng(1)
    requests = [(rng.integers(3, 256, int(n)).tolist(), rng.integers(3, 256, int(k)).tolist())
                for n, k in zip(rng.integers(1, 120, 12), rng.integers(1, 5, 12))]
    prompts = [GenerationRequest(rng.integers(3, 256, int(n)).tolist(), ("\n",), 8)
               for n in rng.integers(1, 30, 4)]
    one, eight = Engine(ckpt, mesh="1:1:1"), Engine(ckpt)
    assert one.mesh.size == 1 and eight.mesh.size == 8
    a, b = one.loglikelihood(requests), eight.loglikelihood(requests)
    assert [g for _, g in a] == [g for _, g in b]
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5, atol=1e-5)
    assert one.generate_ids(prompts) == eight.generate_ids(prompts)


def test_two_hundred_requests_compile_a_handful_of_programs(tmp_path, monkeypatch):
    """200 requests of 5 to 600 tokens: one program per bucket length (32 ... 1024 tokens,
    six), the batch size fixed per bucket; the results do not depend on the batching."""
    from qwen_jax.evaluate.engine import Engine

    ckpt = byte_model(tmp_path / "ckpt", monkeypatch)
    engine = Engine(ckpt, batch_tokens=8192)
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(200):
        n = int(rng.integers(5, 601))
        cont = int(rng.integers(1, min(n - 1, 20) + 1))
        ids = rng.integers(3, 256, n).tolist()
        requests.append((ids[:n - cont], ids[n - cont:]))
    results = engine.loglikelihood(requests)
    assert len(engine.programs) <= 6, sorted(engine.programs)
    assert {p[2] for p in engine.programs} <= {32, 64, 128, 256, 512, 1024}
    small = Engine(ckpt, batch_tokens=1024, mesh="1:1:1")
    picked = [0, 7, 50, 199]
    again = small.loglikelihood([requests[i] for i in picked])
    np.testing.assert_allclose([results[i][0] for i in picked], [x for x, _ in again],
                               rtol=1e-5)


def test_the_lm_eval_command_finds_the_backend(model, tmp_path, monkeypatch):
    tasks = model[2]
    ckpt = byte_model(tmp_path / "ckpt", monkeypatch, seq_length=256)
    result = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "lm_eval"), "--model", "qwen_jax",
         "--model_args", f"checkpoint={ckpt},mesh=1:1:1", "--tasks", "qj_mc",
         "--include_path", str(tasks), "--limit", "4"],
        cwd=runs.ROOT, env=dict(runs.env(), HF_DATASETS_OFFLINE="1"), capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qj_mc" in result.stdout and "acc" in result.stdout, result.stdout[-2000:]


def test_bad_model_arguments_are_one_line_errors(tmp_path, model):
    from qwen_jax.evaluate.__main__ import main
    from qwen_jax.evaluate.engine import EvalError
    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    ckpt, _, tasks = model
    cases = {(str(tmp_path / "missing"), ()): "no such checkpoint directory",
             (str(ckpt), (("colour", "blue"),)): "unknown model argument(s) ['colour']",
             (str(ckpt), (("mesh", "3:3:1"),)): "mesh (3, 3, 1)",
             (str(ckpt), (("mesh", "two"),)): "expected data:fsdp:tensor"}
    for (checkpoint, extra), expected in cases.items():
        with pytest.raises(EvalError, match=re.escape(expected)):
            QwenJaxLM(checkpoint=checkpoint, **dict(extra))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--checkpoint", str(ckpt), "--task", "lm-eval:qj_mc", "--include-path",
                     str(tasks), "--mesh", "3:3:1"])
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: mesh (3, 3, 1)"), lines


@pytest.mark.slow
def test_two_processes_give_what_one_gives(tmp_path, monkeypatch):
    """`python -m qwen_jax.evaluate` on 2 processes x 4 CPU devices gives what 1 process x 8
    devices gives, example by example, on both processes (C-Eval's protocol on a small
    byte-level model: every batch split over both processes' devices). Over 30 s: three
    processes."""
    import csv

    ckpt = byte_model(tmp_path / "ckpt", monkeypatch, seq_length=512)
    rng = np.random.default_rng(4)
    for split, n in (("dev", 5), ("val", 6)):
        (tmp_path / "ceval" / split).mkdir(parents=True)
        for subject in ("college_physics", "tax_accountant"):
            with open(tmp_path / "ceval" / split / f"{subject}_{split}.csv", "w",
                      newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                for i in range(n):
                    w.writerow([i, " ".join(rng.choice(WORDS, int(rng.integers(2, 30)))),
                                *rng.choice(WORDS, 4), "ABCD"[i % 4]])
    port = runs.free_port()

    def launch(processes):
        env = runs.env(8 // processes)
        procs = []
        for i in range(processes):
            extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                      f"--process_id={i}"] if processes > 1 else [])
            cmd = [sys.executable, "-m", "qwen_jax.evaluate", "--checkpoint", str(ckpt),
                   "--task", "ceval", "--data", str(tmp_path / "ceval"), "--batch-tokens",
                   "2048", "--json", str(tmp_path / f"p{processes}_{i}.json"), *extra]
            procs.append(subprocess.Popen(cmd, cwd=runs.ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        return out

    launch(1)
    launch(2)
    one = json.loads((tmp_path / "p1_0.json").read_text())
    two = json.loads((tmp_path / "p2_0.json").read_text())
    assert not (tmp_path / "p2_1.json").exists()  # process 0 writes
    assert one["count"] == two["count"] == 12
    assert [e["pred"] for e in two["examples"]] == [e["pred"] for e in one["examples"]]
    np.testing.assert_allclose([e["logprobs"] for e in two["examples"]],
                               [e["logprobs"] for e in one["examples"]], rtol=1e-5, atol=1e-5)
    assert two["value"] == one["value"]


def test_the_chat_template_is_the_release_chatml(model):
    """lm-eval's --apply_chat_template: the prompt's tokens are those of the release's
    make_context (ChatML, its default system message), and such a turn ends at <|im_end|>."""
    from qwen_jax.data import chat_format
    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    lm = QwenJaxLM(checkpoint=str(model[0]), mesh="1:1:1")
    text = lm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    _, want = chat_format.make_context(lm.tokenizer, "What is 2 + 2?")
    assert lm.tok_encode(text) == want
    with_system = lm.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    assert lm.tok_encode(with_system) == chat_format.make_context(lm.tokenizer, "Hi",
                                                                  system="Be brief.")[1]
    from lm_eval.api.instance import Instance

    request = Instance("generate_until", {}, (text, {"until": ["\n\n"], "max_gen_toks": 6}), 0)
    captured = {}
    original = lm.engine.generate

    def spy(requests, progress=None):
        captured["stop_ids"] = requests[0].stop_ids
        return original(requests, progress)

    lm.engine.generate = spy
    lm.generate_until([request])
    assert captured["stop_ids"] == (lm.tokenizer.im_end_id,)
