"""`python -m qwen_jax.evaluate`: the report's Table 2 protocols, and lm-eval tasks, on a
checkpoint.

    python -m qwen_jax.evaluate --checkpoint DIR --task mmlu --data data/mmlu
    python -m qwen_jax.evaluate --checkpoint DIR --task ceval --data data/ceval
    python -m qwen_jax.evaluate --checkpoint DIR --task gsm8k --data data/gsm8k
    python -m qwen_jax.evaluate --checkpoint DIR --task humaneval
    python -m qwen_jax.evaluate --checkpoint DIR --task lm-eval:mbpp,bbh --num-fewshot 3

mmlu, ceval, gsm8k and humaneval are the release's own protocols (qwen_jax.evaluate.protocols);
`lm-eval:TASKS` runs lm-evaluation-harness tasks through the qwen_jax backend. A markdown row
in Table 2's style goes to stdout; --json also writes every example's prompt ids, prediction
and correctness (with --task lm-eval: lm-eval's results and each request's responses).
--mesh data:fsdp:tensor shards the model (default 1:-1:1); several processes take
--coordinator_address, --num_processes and --process_id (each runs every example; process 0
prints and writes).
"""

from __future__ import annotations

import json
import pathlib
import sys

from qwen_jax.cli import CLIError, Parser, run_cli
from qwen_jax.evaluate.engine import EvalError


def _parser() -> Parser:
    p = Parser(prog="python -m qwen_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="an import, a training run's workdir or one of its steps, a LoRA run")
    p.add_argument("--task", required=True,
                   help="mmlu, ceval, gsm8k, humaneval, or lm-eval:TASK[,TASK...]")
    p.add_argument("--data", help="the task's data folder or file (see --help of each task)")
    p.add_argument("--limit", type=int, help="at most this many examples (per subject)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--mesh", default="1:-1:1", help="data:fsdp:tensor (-1 = fill)")
    p.add_argument("--max-length", type=int, help="tokens a request may use (default: the "
                   "model's seq_length)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="gsm8k, humaneval: tokens generated at most")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="tokens of a scoring batch (rows x bucket length)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: shots")
    p.add_argument("--include-path", help="lm-eval: a folder of task YAML files")
    p.add_argument("--coordinator_address")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    return p


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit {args.limit}: expected >= 1")
    from qwen_jax.evaluate import protocols

    lm_tasks = args.task.split(":", 1)[1] if args.task.startswith("lm-eval:") else None
    if lm_tasks is None and args.task not in protocols.TASKS:
        raise CLIError(f"--task {args.task!r}: expected one of {sorted(protocols.TASKS)} or "
                       "lm-eval:TASK[,TASK...]")
    if args.task in ("mmlu", "ceval", "gsm8k") and not args.data:
        raise CLIError(f"--task {args.task} needs --data (the data set's folder)")
    if args.data and not pathlib.Path(args.data).exists():
        raise CLIError(f"--data {args.data}: no such file or folder")

    import jax

    from qwen_jax.train.processes import initialize_distributed

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    primary = jax.process_index() == 0
    name = pathlib.Path(args.checkpoint).name
    if lm_tasks is not None:
        result = _lm_eval(args, lm_tasks)
        if primary:
            from lm_eval.utils import make_table

            print(make_table(result))
            samples = {task: [{"doc_id": x["doc_id"], "resps": x["resps"],
                               "filtered_resps": x["filtered_resps"]}
                              for x in sorted(rows, key=lambda x: x["doc_id"])]
                       for task, rows in result.get("samples", {}).items()}
            _write(args.json, {"results": result["results"], "n-shot": result.get("n-shot"),
                               "samples": samples})
        return 0

    from qwen_jax.evaluate.engine import Engine

    protocols.check_data(args.task, args.data)
    if args.task == "humaneval":
        from qwen_jax.sandbox import check_sandbox

        check_sandbox()
    engine = Engine(args.checkpoint, dtype=args.dtype, mesh=args.mesh,
                    max_length=args.max_length, batch_tokens=args.batch_tokens)
    title, run = protocols.TASKS[args.task]
    kwargs = ({} if args.task in ("mmlu", "ceval")
              else {"max_new_tokens": args.max_new_tokens})
    score = run(engine, args.data, limit=args.limit, **kwargs)
    if primary:
        print(f"| model | {title} |\n|---|---|\n| {name} | {100 * score.value:.1f} |")
        hard = (f" (hard subjects: {100 * score.groups['hard']:.2f})"
                if "hard" in score.groups else "")
        print(f"{args.task}: {score.metric} {100 * score.value:.2f}{hard} over {score.count} "
              f"examples", file=sys.stderr)
        _write(args.json, {"task": args.task, "metric": score.metric, "value": score.value,
                           "count": score.count, "groups": score.groups,
                           "examples": score.details})
    return 0


def _lm_eval(args, tasks: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from qwen_jax.evaluate.lm_eval_backend import QwenJaxLM

    names = [t for t in tasks.split(",") if t]
    manager = None
    if args.include_path:  # its tasks alone index in a fraction of lm-eval's ~15k
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if not names or unknown:
        raise CLIError(f"--task lm-eval:{tasks}: unknown lm-eval task {unknown[:1] or ['']}"
                       "; `lm_eval ls tasks` lists them (--include-path adds a folder)")
    lm = QwenJaxLM(checkpoint=args.checkpoint, dtype=args.dtype, mesh=args.mesh,
                   max_length=args.max_length, batch_tokens=args.batch_tokens)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                   num_fewshot=args.num_fewshot, limit=args.limit,
                                   log_samples=bool(args.json))


def _write(path, payload) -> None:
    if path:
        tmp = pathlib.Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(path)
        print(f"results written to {path}", file=sys.stderr)


def main(argv=None) -> int:
    from qwen_jax.sandbox import SandboxUnavailable

    return run_cli(_main, argv, errors=(EvalError, SandboxUnavailable))


if __name__ == "__main__":
    sys.exit(main())
