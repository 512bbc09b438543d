"""Train a Qwen v1 model: `python train.py --config configs/<name>.py --workdir DIR
[--config.<key>=<value> ...]`.

Resumes automatically from the latest complete checkpoint in DIR/checkpoints. SIGTERM
(preemption) saves a checkpoint and exits cleanly. See configs/base.py for the keys.

Compile-only (no TPU, no data, no workdir; see qwen_jax/train/aot.py):
`python train.py --config configs/14b.py --compile-only --topology v5:4x4x2 [--num-slices N]`
prints per-device memory against HBM, XLA FLOPs, collectives and a roofline step time / MFU,
and exits 1 with the compiler's message when the config does not fit.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<name>.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the training and decode steps for --topology on this host "
    "and report memory, FLOPs, collectives and estimated MFU; reads no data, writes nothing.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile-only target, libtpu names: v5e:16x16, v5:4x4x2 (v5p), v6e:8x16, "
    "v4:4x4x8; '2xv5e:16x16' for 2 slices.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Compile-only: number of slices (DCN).")
_DECODE_BATCH = flags.DEFINE_integer(
    "decode_batch", 0, "Compile-only: rows of the decode step (0 = a multiple of the "
    "data-parallel size, at least 8; -1 = skip the decode step).")
_XLA_COST = flags.DEFINE_boolean(
    "xla_cost", True, "Compile-only: also XLA's cost analysis of the whole training step "
    "(four more compiles of 1-2 layers) and the step time and MFU it implies.")
_REPORT_JSON = flags.DEFINE_string("report_json", None, "Compile-only: also write the report "
                                   "as JSON to this file.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator "
    "(with --num_processes and --process_id; TPU pods and SLURM are detected without them).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's index.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "End this invocation at this step, with a checkpoint, without "
    "changing the schedule (a later run resumes from there).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _CONFIG.value.to_dict()  # a config file that failed to load raises here
    except OSError as e:  # absl's message ends with the reason, e.g. "[Errno 2] No such file"
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        print(f"error: --config: cannot load {flags.FLAGS['config'].config_filename}: "
              f"{reason}", file=sys.stderr)
        sys.exit(2)
    if _COMPILE_ONLY.value:
        sys.exit(compile_only())
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (except with --compile-only)")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    from qwen_jax.train import loop as train_loop
    from qwen_jax.train import processes

    config = _CONFIG.value
    try:
        processes.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
        task = None
        if config.get("task", "lm") != "lm":
            from qwen_jax.align.tasks import make_task
            task = make_task(config)
        summary = train_loop.train(config, _WORKDIR.value,
                                   config_json=config.to_json_best_effort(),
                                   stop_at_step=_STOP_AT_STEP.value, task=task)
    except train_loop.TrainError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)
    if processes.is_primary() and not summary["preempted"] and (
            task is None or task.kind != "reward"):  # a reward model has no lm_head
        print(f"sample from it: python -m qwen_jax.generate --checkpoint {_WORKDIR.value} "
              "--prompt 'def ' --max-new-tokens 200", flush=True)


def compile_only() -> int:
    if not _TOPOLOGY.value:
        raise app.UsageError("--compile-only needs --topology (e.g. v5e:2x4, v5:4x4x2)")
    # Compile for the topology only; never claim this host's accelerators.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from qwen_jax.parallel.devices import quiet_topology_compiles

    quiet_topology_compiles()
    logging.set_verbosity(logging.WARNING)
    from qwen_jax.train import aot
    from qwen_jax.train import loop as train_loop

    decode = None if _DECODE_BATCH.value < 0 else _DECODE_BATCH.value
    checker = aot
    if _CONFIG.value.get("task", "lm") != "lm":
        from qwen_jax.align import aot as checker
    try:
        extra = {"with_xla_cost": _XLA_COST.value} if checker is aot else {}
        report = checker.check(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value, decode,
                               **extra)
    except (aot.AotError, train_loop.TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(checker.format_report(report), flush=True)
    if _REPORT_JSON.value:
        aot.write_json(report, _REPORT_JSON.value)
    if not report["fits"]:
        failed = [s for s in ("train", "decode") if not report.get(s, {"fits": True})["fits"]]
        for step in failed:
            print(f"error: the {step} step does not fit on {report['topology']}: "
                  f"{report[step]['error']}", file=sys.stderr)
        return 1
    return 0


def parse_flags(argv):
    """absl's parser, with config-override mistakes (unknown key, wrong type) reported as one
    line instead of a traceback. Flag names may use dashes (--compile-only, --num-slices)."""
    argv = [_underscored(a) for a in argv]
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        key = str(e).strip("'\"")
        arg = next((a for a in argv if a.startswith("--config.") and key in a), key)
        print(f"error: unknown config key {key!r} in {arg} (configs/base.py lists the keys)",
              file=sys.stderr)
    except SyntaxError as e:  # in the config file
        print(f"error: --config: {e.filename}:{e.lineno}: {e.msg}", file=sys.stderr)
    except (flags.Error, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _underscored(arg: str) -> str:
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
