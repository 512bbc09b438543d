"""Training metrics: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard event
files, and a tqdm progress bar. Only the primary process writes."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import tqdm


class MetricsWriter:
    def __init__(self, workdir, total_steps: int, initial_step: int, enabled: bool = True):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        path = self.workdir / "metrics.jsonl"
        _keep_until(path, initial_step)
        self._jsonl = open(path, "a", buffering=1)
        try:
            self._tb = _summary_writer(self.workdir / "tensorboard")
        except ImportError:  # TensorBoard is optional; metrics.jsonl always has everything
            self._tb = None
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                              dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        # Strict JSON: a non-finite value is written as null and named under "nonfinite".
        nonfinite = sorted(k for k, v in record.items()
                           if isinstance(v, float) and not math.isfinite(v))
        if nonfinite:
            record.update({k: None for k in nonfinite}, nonfinite=nonfinite)
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if isinstance(record.get("loss"), float):
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 8)
    return value


def _keep_until(path: pathlib.Path, step: int) -> None:
    """Drop what a resumed run will log again: records after `step` (the checkpoint it
    resumes from) and a last line cut short by a kill, so each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _summary_writer(logdir):
    """tensorboardX's SummaryWriter, imported without importing torch.

    tensorboardX imports torch when it is installed (to accept torch tensors), which costs a
    training process about 1.1 s of start-up on a 2-core CPU (`python -X importtime`). We log
    Python floats only, so torch is hidden from that one import, as if it were not installed;
    a process that has already imported torch keeps it."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is here
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))
