"""Requests per second of lm-eval with our backend (`qwen_jax`) against lm-eval's `hf` backend
(transformers, PyTorch) on the same CPU, the same weights (our --format qwen2 export) and the
same tasks, each backend at its best batch size.

    python bench/lm_eval_speed.py [--hidden 256] [--layers 2] [--docs 24] [--gen-docs 8]
                                  [--hf-batch-sizes 1,8,24] [--batch-tokens 4096,16384]

Two local tasks: multiple choice (4 single-token answers after a few-shot-long question:
loglikelihood, --docs x 4 requests) and generate_until (greedy, 32 tokens, --gen-docs requests).
Each configuration runs twice and the second run is timed (compiles and warm-ups excluded; the
first run of ours is reported too: it includes compiling). Needs the Qwen vocabulary
(../shared/reference/qwen.tiktoken or $QWEN_TIKTOKEN).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("river stone light garden window paper music winter orange silver forest bridge "
         "candle mountain letter yellow ocean market engine cloud").split()


def make_tasks(folder: pathlib.Path, docs: int, gen_docs: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)

    def words(n):
        return " ".join(rng.choice(WORDS, n))

    mc = [{"question": words(int(rng.integers(50, 150))), "choices": [words(2)] * 4,
           "answer": int(rng.integers(4))} for _ in range(docs)]
    gen = [{"question": words(int(rng.integers(20, 80))), "answer": "x"}
           for _ in range(gen_docs)]
    bodies = {
        "speed_mc": (mc, 'output_type: multiple_choice\ndoc_to_text: "{{question}}\\nAnswer:"\n'
                     'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
                     "metric_list:\n  - metric: acc\n"),
        "speed_gen": (gen, 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
                      'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["QQQ"]\n'
                      "  max_gen_toks: 32\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n"),
    }
    for task, (rows, body) in bodies.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n" + body)


def timed(lm, task: str, manager) -> tuple[float, int]:
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                  log_samples=True)
    seconds = time.perf_counter() - start
    return seconds, sum(len(s["resps"]) for s in out["samples"][task])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--gen-docs", type=int, default=8)
    p.add_argument("--hf-batch-sizes", default="1,8,24")
    p.add_argument("--batch-tokens", default="4096,16384")
    p.add_argument("--tiktoken", default=os.environ.get(
        "QWEN_TIKTOKEN", str(ROOT.parent / "shared" / "reference" / "qwen.tiktoken")))
    args = p.parse_args(argv)

    import jax
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import convert_hf
    from qwen_jax import QwenConfig, init_params, save_checkpoint
    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    config = QwenConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                        kv_channels=args.hidden // args.heads, num_hidden_layers=args.layers,
                        intermediate_size=args.hidden * 4, vocab_size=151936, seq_length=2048,
                        dtype="float32", param_dtype="float32")
    root = pathlib.Path(tempfile.mkdtemp(prefix="lm_eval_speed_"))
    ckpt = save_checkpoint(root / "ckpt", init_params(config, jax.random.PRNGKey(0)), config,
                           tokenizer_file=args.tiktoken)
    if convert_hf.main(["export", str(ckpt), str(root / "hf"), "--format", "qwen2"]) != 0:
        return 1
    make_tasks(root, args.docs, args.gen_docs)
    manager = TaskManager(include_path=str(root))
    print(f"model: {config.num_params() / 1e6:.1f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers, vocab 151936), float32; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, jax {jax.__version__} on "
          f"{jax.devices()[0].platform} x {jax.device_count()}", flush=True)

    rows = []
    for task in ("speed_mc", "speed_gen"):
        best = {}
        for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
            lm = HFLM(pretrained=str(root / "hf"), dtype="float32", batch_size=bs,
                      device="cpu", max_length=2048)
            timed(lm, task, manager)
            seconds, n = timed(lm, task, manager)
            rows.append((task, "hf", f"batch_size={bs}", n, seconds, None))
            best["hf"] = max(best.get("hf", 0), n / seconds)
            print(rows[-1], flush=True)
        for tokens in [int(t) for t in args.batch_tokens.split(",")]:
            lm = QwenJaxLM(checkpoint=str(ckpt), batch_tokens=tokens, mesh="1:1:1")
            first, _ = timed(lm, task, manager)
            seconds, n = timed(lm, task, manager)
            rows.append((task, "qwen_jax", f"batch_tokens={tokens}", n, seconds, first))
            best["qwen_jax"] = max(best.get("qwen_jax", 0), n / seconds)
            print(rows[-1], flush=True)
        rows.append((task, "best", "", 0, 0.0, best["qwen_jax"] / best["hf"]))

    print("\n| task | backend | batch | requests | seconds | requests/s | first run (s) |")
    print("|---|---|---|---|---|---|---|")
    for task, backend, batch, n, seconds, extra in rows:
        if backend == "best":
            print(f"| {task} | **qwen_jax / hf (best of each)** | | | | **{extra:.2f}x** | |")
        else:
            first = f"{extra:.1f}" if extra is not None else "-"
            print(f"| {task} | {backend} | {batch} | {n} | {seconds:.1f} | "
                  f"{n / seconds:.1f} | {first} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
