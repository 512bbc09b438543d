"""bench/gpu_check.sh, the GPU readiness check, exercised on the CPU: `--cpu-smoke` runs its three
parts (the flash-attention tests, the attention benchmark, the training-step benchmark) at tiny
shapes with the Triton kernel interpreted; a part that fails does not stop the others; the GPU
mode refuses a CPU backend; and the summary reads timeouts and the pallas / cuDNN ratio."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
from runs import bench_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_check(out, *args, python=sys.executable, timeout=900, **env):
    full_env = dict(os.environ, OUT=str(out), PYTHON=str(python), **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def summary(out) -> list[str]:
    return (pathlib.Path(out) / "summary.txt").read_text().splitlines()


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_passes(tmp_path):
    result = run_check(tmp_path, "--cpu-smoke")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = summary(tmp_path)
    assert lines[0] == "== gpu_check summary (cpu) =="
    assert lines[1].startswith("tests: ok - 3 passed"), lines
    assert lines[2].startswith("attention: ok - fwd/fwd+bwd pallas@128 "), lines
    assert "jax.nn.dpa(xla)@128" in lines[2]
    assert lines[3].startswith("train_step: ok - pallas "), lines
    assert "xla " in lines[3] and "first-step loss pallas" in lines[3]
    assert lines[4].startswith("attention ratio at seq 128: fwd "), lines
    assert "fwd+bwd " in lines[4]
    assert lines[5] == "gpu_check: PASS (3 of 3 parts ok)"
    assert "\n".join(lines) in result.stdout
    for name in ("versions.txt", "tests.log", "attention.log", "train_step.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "jax backend cpu" in (tmp_path / "versions.txt").read_text()
    train = json.loads((tmp_path / "train_step.json").read_text())
    rows = {r["impl"]: r for r in train["results"]}
    assert set(rows) == {"pallas", "xla"} and all(r["finite"] for r in rows.values())
    # The same model and batch: the interpreted Triton kernel's loss is the XLA attention's.
    assert abs(rows["pallas"]["first_loss"] - rows["xla"]["first_loss"]) < 1e-3
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert {r["impl"] for r in attention["rows"]} == {"pallas", "jax.nn.dpa(xla)"}


def test_a_failing_part_does_not_stop_the_others(tmp_path):
    """Every part fails at once (a stand-in interpreter); all three still run and the exit
    code says the check failed."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2" == "-m pytest" || "$1" == bench/attention.py || "$1" == bench/gpu_train_step.py ]]
then
  echo "simulated failure: $*"
  exit 3
fi
exec {sys.executable} "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    result = run_check(out, "--cpu-smoke", python=fake, timeout=300)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    for part in ("tests", "attention", "train_step"):
        assert "simulated failure" in (out / f"{part}.log").read_text(), part
    lines = summary(out)
    assert lines[1].startswith("tests: failed - exit code 3"), lines
    assert lines[2].startswith("attention: failed - exit code 3; no attention.json"), lines
    assert lines[3].startswith("train_step: failed - exit code 3; no train_step.json"), lines
    assert lines[4] == "attention ratio at seq 128: not measured"
    assert lines[5] == "gpu_check: FAIL (0 of 3 parts ok)"


def test_gpu_mode_refuses_a_cpu_backend(tmp_path):
    result = run_check(tmp_path, timeout=300, JAX_PLATFORMS="cpu")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    assert "jax.default_backend() is 'cpu', expected 'gpu'" in result.stdout
    assert "gpu_check: FAIL (wrong or no JAX backend" in result.stderr
    assert not (tmp_path / "tests.log").exists()


def test_unknown_argument_is_refused(tmp_path):
    result = run_check(tmp_path, "--bogus", timeout=60)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


@pytest.fixture(scope="module")
def summary_module():
    return bench_module("gpu_check_summary")


def test_summary_reads_ratio_timeouts_and_errors(tmp_path, summary_module):
    (tmp_path / "tests.log").write_text("....ss\n12 passed, 14 skipped, 3 warnings in 80.1s\n")
    rows = [{"impl": "pallas", "seq": 8192, "batch": 4, "fwd_ms": 2.0, "fwd_bwd_ms": 8.0},
            {"impl": "jax.nn.dpa(cudnn)", "seq": 8192, "batch": 4, "fwd_ms": 3.0,
             "fwd_bwd_ms": 6.0},
            {"impl": "pallas", "seq": 16384, "batch": 2, "fwd_error": "XlaRuntimeError: boom"}]
    (tmp_path / "attention.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "train_step.json").write_text(json.dumps({"results": [
        {"impl": "pallas", "batch": 16, "seq": 2048, "step_s": 1.0, "tokens_per_s": 32768.0,
         "mfu": 0.4, "first_loss": 11.93}]}))
    code = summary_module.main([str(tmp_path), "--status", "tests=0", "--status", "attention=0",
                                "--status", "train_step=124", "--timeout", "train_step=190"])
    lines = summary(tmp_path)
    assert code == 1
    assert lines[1] == "tests: ok - 12 passed, 14 skipped, 3 warnings in 80.1s"
    assert lines[2].startswith("attention: failed - pallas@16384: XlaRuntimeError: boom"), lines
    assert lines[3] == ("train_step: failed - timed out after 190 s; pallas 32,768 tokens/s, "
                        "MFU 40.0% (batch 16 x 2048)")
    assert lines[4] == ("attention ratio at seq 8192: fwd 1.50x, fwd+bwd 0.75x "
                        "(jax.nn.dpa(cudnn) time / pallas time; >= 1.00x: pallas at least as "
                        "fast)")
    assert lines[5] == "gpu_check: FAIL (1 of 3 parts ok)"


def test_train_step_cudnn_variant_swaps_the_attention_while_tracing(monkeypatch):
    """bench/gpu_train_step.py's "cudnn" implementation (GPU only) on the CPU: while its train
    step is traced (the Trainer's, as the benchmark runs it), the model's attention goes to
    jax.nn.dot_product_attention(implementation="cudnn") with bf16 [B, T, N, D] and the causal
    mask, and the XLA attention is back afterwards."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.model import attention as attention_mod
    from qwen_jax.parallel import sharding
    from qwen_jax.train.optim import OptimizerConfig
    from qwen_jax.train.steps import Trainer

    bench = bench_module("gpu_train_step")
    calls = []
    real = jax.nn.dot_product_attention

    def fake(q, k, v, **kw):  # cuDNN is not on the CPU: XLA's attention, recording the call
        calls.append((q.shape, q.dtype, kw))
        return real(q, k, v, is_causal=kw["is_causal"], scale=kw["scale"])

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    config = bench.model_config(bench.SMOKE_SHAPE, "cudnn", "minimal")
    assert config.attention_impl == "xla" and config.dtype == "bfloat16"
    trainer = Trainer(config, OptimizerConfig(warmup_steps=0, total_steps=10),
                      sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    batch = {key: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for key, v in bench.make_batch(config, 2, 32).items()}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    fn, state = trainer.jit_train_step(), trainer.abstract_state()  # as run_impl: outside
    with bench.attention_as("cudnn"):
        fn.lower(state, batch, rng)
    assert attention_mod.IMPLEMENTATIONS["xla"] is attention_mod.xla_attention
    n, d = config.num_attention_heads, config.head_dim
    assert calls and all(c == ((2, 32, n, d), jnp.bfloat16,
                               {"is_causal": True, "scale": None, "implementation": "cudnn"})
                         for c in calls), calls
