"""Compile-only mode (`train.py --compile-only`): real TPU compiles on this CPU host through
libtpu, for the tiny config on two topologies (one multi-slice), a production preset, a
config that cannot fit, and bad input; plus the topology parser and the roofline model."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from qwen_jax.model.config import preset
from qwen_jax.train import aot, roofline

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
ENV.pop("XLA_FLAGS", None)  # conftest's 8 host devices are not wanted in the child


def compile_only(config, topology, *args, tmp_path=None):
    cmd = [sys.executable, "train.py", "--config", f"configs/{config}.py", "--compile-only",
           "--topology", topology, *args]
    if tmp_path is not None:
        cmd += ["--report-json", str(tmp_path / "report.json")]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("topology,devices,mesh,chip", [
    ("v5e:2x4", 8, "data 1 x fsdp 8 x tensor 1", "v5e"),
    ("2xv5:2x2x1", 8, "data 2 x fsdp 4 x tensor 1", "v5p"),  # data across the 2 slices
])
def test_tiny_compiles_and_reports(tmp_path, topology, devices, mesh, chip):
    # A data source that does not exist proves nothing is read; no --workdir is needed.
    proc = compile_only("tiny", topology, "--config.data.source=/nonexistent/corpus",
                        tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(w in proc.stderr for w in ("E0000", "Failed to find host bounds",
                                              "unexpected worker hostname")), proc.stderr
    out = proc.stdout
    assert f"{devices} devices" in out and f"mesh {mesh}" in out
    for field in ("train step: compiled in", "decode step: compiled in", "arguments",
                  "temporaries", "HBM per device", "XLA FLOPs per device", "collectives:",
                  "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                  "roofline: compute", "estimated MFU", "attention pallas", "result: fits",
                  "XLA cost_analysis of the whole step (2 loop-free compiles",
                  "extrapolated to 2 layers x 1 microbatches", "bytes accessed",
                  "bytes at HBM bandwidth"):
        assert field in out, (field, out)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fits"] and report["chip"] == chip and report["devices"] == devices
    train = report["train"]
    hbm = roofline.CHIPS[chip].hbm_bytes
    assert 0 < train["memory"]["total"] < hbm and train["hbm_per_device"] == hbm
    assert train["xla_flops_per_device"] > 0
    assert sum(train["collectives"].values()) > 0  # FSDP needs gathers of the weights
    assert report["decode"]["batch"] % (report["mesh"]["data"] * report["mesh"]["fsdp"]) == 0
    assert 0 < report["roofline"]["mfu"] <= 1
    assert 0 < report["roofline"]["xla_mfu"] <= 1 and report["xla_cost"]["loops_left"] == 0
    assert report["xla_cost"]["flops"] > report["train"]["xla_flops_per_device"]
    assert not list(tmp_path.iterdir())[1:]  # only the report was written


def test_production_preset_compiles(tmp_path):
    # The real 1.8B model (24 layers, 152k vocabulary) with a small batch so it compiles fast.
    proc = compile_only("1_8b", "v5e:2x4", "--config.global_batch_size=8",
                        "--config.data.seq_len=512", "--decode-batch=-1", "--noxla_cost",
                        tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params"] == preset("1_8b").num_params() and report["remat_policy"] == "minimal"
    memory = report["train"]["memory"]
    # float32 params + Adam moments, FSDP-sharded 8 ways, are part of the arguments
    assert memory["argument"] >= 12 * report["params"] / 8
    assert memory["total"] < 16 * 2 ** 30 and "decode" not in report
    assert "result: fits" in proc.stdout


def test_config_that_cannot_fit_fails_with_compiler_message():
    proc = compile_only("72b", "v5e:2x2", "--config.mesh=(1,-1,1)",
                        "--config.global_batch_size=4", "--config.microbatches=1",
                        "--decode-batch=-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "train step does not fit on v5e:2x2" in errors[0]
    assert "RESOURCE_EXHAUSTED" in errors[0] and "HBM" in errors[0]


@pytest.mark.parametrize("topology,message", [
    ("v9z:2x2", "unknown TPU topology 'v9z:2x2'"),
    ("v5e-16", "bad topology 'v5e-16'"),
])
def test_bad_topology_is_one_clear_error(topology, message):
    proc = compile_only("tiny", topology)
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and message in errors[0] and "v5e:2x4" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_workdir_still_required_for_training():
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--workdir is required" in proc.stderr


def test_parse_topology():
    assert aot.parse_topology("v5e:16x16") == ("v5e:16x16", 1)
    assert aot.parse_topology("2xv5e:16x16") == ("v5e:16x16", 2)
    assert aot.parse_topology("v5p:4x4x2", 4) == ("v5:4x4x2", 4)
    for bad in ("v5e", "16x16", "v5e:16", "tpu:2x2"):
        with pytest.raises(aot.AotError, match="expected a libtpu topology name"):
            aot.parse_topology(bad)
    with pytest.raises(aot.AotError, match="says 2 slices but --num-slices=3"):
        aot.parse_topology("2xv5e:2x2", 3)


def test_roofline_model():
    config = preset("14b", remat_policy="full")
    mesh = {"data": 1, "fsdp": 8, "tensor": 4}
    est = roofline.estimate(config, chip=roofline.CHIPS["v5p"], seq_len=2048,
                            global_batch=2048, microbatches=4, mesh=mesh)
    # full remat runs the layers' forward twice (not the LM head): ~3/4 of executed is model
    assert est["executed_flops_per_device"] / est["model_flops_per_device"] == pytest.approx(
        4 / 3, rel=0.02)
    # ... and the tensor-parallel all-reduces add to the step (they feed the next matmul)
    assert est["bound"] == "compute" and est["tensor_comm_seconds"] > 0
    assert est["step_seconds"] == pytest.approx(est["compute_seconds"]
                                                + est["tensor_comm_seconds"])
    assert 0.6 < est["mfu"] < 0.74
    assert est["serial_mfu"] < est["mfu"]
    # no recompute, no tensor parallelism: the roofline MFU is exactly 1 when compute-bound
    lean = roofline.estimate(config.replace(remat_policy="none"), chip=roofline.CHIPS["v5p"],
                             seq_len=2048, global_batch=2048, microbatches=1,
                             mesh={"data": 1, "fsdp": 32, "tensor": 1})
    assert lean["mfu"] == pytest.approx(1.0)
    # XLA's counts: its FLOPs replace the analytic ones, HBM traffic can bound the step
    xla = {"flops": 1.1 * est["executed_flops_per_device"], "bytes_accessed": 1e12}
    with_xla = roofline.estimate(config, chip=roofline.CHIPS["v5p"], seq_len=2048,
                                 global_batch=2048, microbatches=4, mesh=mesh, xla=xla)
    assert with_xla["xla_bound"] == "compute" and with_xla["xla_mfu"] < with_xla["mfu"]
    heavy = roofline.estimate(config, chip=roofline.CHIPS["v5p"], seq_len=2048,
                              global_batch=2048, microbatches=4, mesh=mesh,
                              xla={**xla, "bytes_accessed": 2e14})
    assert heavy["xla_bound"] == "HBM bandwidth"
    assert heavy["xla_memory_seconds"] == pytest.approx(2e14 / 2765e9)
    assert heavy["xla_mfu"] < with_xla["xla_mfu"]
    # XLA's own per-op timing, where it has one, is the device time
    timed = roofline.estimate(config, chip=roofline.CHIPS["v5p"], seq_len=2048,
                              global_batch=2048, microbatches=4, mesh=mesh,
                              xla={**xla, "optimal_seconds": 2 * est["compute_seconds"]})
    assert timed["xla_bound"] == "XLA per-op time"
    assert timed["xla_step_seconds"] == pytest.approx(2 * est["compute_seconds"]
                                                      + est["tensor_comm_seconds"])
    # a tiny batch over many chips is communication-bound
    thin = roofline.estimate(config, chip=roofline.CHIPS["v5e"], seq_len=2048,
                             global_batch=64, microbatches=1,
                             mesh={"data": 1, "fsdp": 256, "tensor": 1})
    assert thin["bound"] == "communication" and thin["mfu"] < 0.5
    # two slices put the data-parallel gradient all-reduce on DCN
    two = {"data": 2, "fsdp": 8, "tensor": 4}
    one_slice, two_slices = (roofline.estimate(config, chip=roofline.CHIPS["v5p"], seq_len=2048,
                                               global_batch=2048, microbatches=4, mesh=two,
                                               num_slices=n) for n in (1, 2))
    assert one_slice["dcn_bytes_per_device"] == 0 < two_slices["dcn_bytes_per_device"]
    assert two_slices["comm_seconds"] > one_slice["comm_seconds"]


def test_tpu_traces_keep_the_plain_projection():
    """The bf16 projection with float32-output dots is a CPU speed path; a trace for a TPU
    topology (what --compile-only and docs/scaling.md compile) keeps the plain einsum."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from qwen_jax.model.transformer import Qwen, init_params

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    config = preset("tiny", dtype="bfloat16")
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def custom_vjps():  # of the projections (RoPE has its own everywhere)
        jaxpr = jax.make_jaxpr(lambda p, t: Qwen(config).apply({"params": p}, t)[0])(params, ids)
        return str(jaxpr).count("name=_dense_f32")

    assert custom_vjps() > 0  # on this CPU host
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    with jax.default_device(device):
        assert custom_vjps() == 0


def test_every_compiled_row_of_the_scaling_table_stays_below_peak():
    """The best options bench/scaling.py ranks (and docs/scaling.md lists) stay under 100%
    MFU with room to spare: e.g. 72B on 256 v4 chips with 8-way tensor parallelism was
    estimated at 99% while its 8-way activation all-reduces took a sixth of the step."""
    est = roofline.estimate(preset("72b", remat_policy="minimal"), chip=roofline.CHIPS["v4"],
                            seq_len=2048, global_batch=2048, microbatches=32,
                            mesh={"data": 1, "fsdp": 64, "tensor": 8}, devices_per_chip=2)
    assert est["tensor_comm_seconds"] > 0.1 * est["step_seconds"]
    assert est["mfu"] < 0.9


def test_xla_cost_extrapolates_exactly():
    """XLA counts a loop body once; `aot.xla_cost` extrapolates four unrolled compiles
    (1-2 layers x 2-3 microbatches) to the real step. Its FLOPs equal those of the whole step
    compiled with nothing rolled (3 layers x 3 microbatches), and are what the model's
    formula says (remat none: 3x the forward, with the attention the Pallas kernels' cost
    estimates declare)."""
    import dataclasses

    from qwen_jax.train import build as train_build
    from qwen_jax.train import flops

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = _tiny_cfg(layers=3, micro=3)
    sl = aot.topology("v5e:2x2")
    mesh = aot.topology_mesh(tuple(cfg.mesh), sl)
    cost = aot.xla_cost(cfg, mesh, sl)
    assert "3 layers x 3 microbatches" in cost["method"] and cost["loops_left"] == 0
    trainer = train_build.build_trainer(cfg, mesh)
    config = aot._tpu_model_config(trainer.model_config).replace(scan_layers=False)
    whole = dataclasses.replace(trainer, model_config=config, unroll_microbatches=True,
                                loss=dataclasses.replace(trainer.loss, chunk_tokens=1 << 30))
    direct = aot._cost(aot._lower_train(whole, cfg.global_batch_size, cfg.data.seq_len, mesh,
                                        sl).compile(compiler_options=aot.NO_WINDOWED_EINSUM))
    assert cost["flops"] == pytest.approx(direct["flops"], rel=1e-5)
    assert cost["bytes_accessed"] == pytest.approx(direct["bytes_accessed"], rel=0.02)
    tokens = cfg.global_batch_size * cfg.data.seq_len / 4  # per device
    model = flops.train_flops_per_token(config, cfg.data.seq_len) * tokens
    # the flash kernels' backward recomputes the scores: 9 attention matmuls instead of 6
    attention = (config.num_hidden_layers * 4 * config.hidden_size
                 * flops.mean_keys_per_query(cfg.data.seq_len) * tokens)
    executed = model + 1.5 * attention
    # ... and XLA adds the elementwise work (norms, SwiGLU, AdamW: a few % at this width)
    assert executed < cost["flops"] < 1.06 * executed
    # the rolled program's own count is about one layer of one microbatch
    rolled = aot._cost(aot._lower_train(
        dataclasses.replace(trainer, model_config=aot._tpu_model_config(trainer.model_config)),
        cfg.global_batch_size, cfg.data.seq_len, mesh, sl).compile())
    assert rolled["flops"] < 0.5 * cost["flops"]


def _tiny_cfg(layers: int, micro: int):
    from configs import tiny

    cfg = tiny.get_config()
    cfg.model_overrides.num_hidden_layers = layers
    cfg.model_overrides.remat_policy = "none"
    cfg.model_overrides.dtype = "bfloat16"
    cfg.microbatches = micro
    cfg.global_batch_size = 4 * micro
    cfg.data.seq_len = 256
    return cfg
