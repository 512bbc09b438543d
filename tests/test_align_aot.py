"""Compile-only works for the alignment steps: the reward model step, the DPO step and the
PPO step (four models) with its rollout decode step, for a TPU topology, on this CPU host."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,steps", [("reward_tiny", ["reward model step"]),
                                        ("dpo_tiny", ["DPO step"]),
                                        ("ppo_tiny", ["PPO step", "decode step"])])
def test_alignment_steps_compile_for_tpu(name, steps, tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", f"configs/{name}.py", "--compile-only",
         "--topology", "v5e:2x2", "--report_json", str(report)], cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in steps:
        assert f"{step}" in result.stdout and "result: fits" in result.stdout, result.stdout
    data = json.loads(report.read_text())
    assert data["fits"] and data["train"]["memory"]["total"] > 0
    assert data["train"]["xla_flops_per_device"] > 0
