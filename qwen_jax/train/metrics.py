"""Training metrics: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard event
files, and a tqdm progress bar. Only the primary process writes."""

from __future__ import annotations

import json
import pathlib

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
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always has everything
            self._tb = None
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                              dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if "loss" in record:
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
