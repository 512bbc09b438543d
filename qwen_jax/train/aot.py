"""Compile-only mode: will a training config compile, fit and run fast on a TPU slice?

libtpu's compiler runs on a CPU host: `jax.experimental.topologies` describes a TPU slice
without one, and compiling for it fails with the same out-of-memory error the hardware gives.
`check(cfg, topology)` builds the config's mesh on the topology's devices (the config's mesh
describes one slice; more slices add data parallelism across DCN), lowers the real training
step from shape-only inputs with the config's shardings, and a KV-cache decode step (one
token per row, cache at the config's seq_len), compiles both and reports per-device memory
against HBM, XLA's FLOP count, the collectives in the program, and the roofline estimate of
`qwen_jax.roofline` (the model and the chip numbers are documented there). No data is read.

Topology names are libtpu's: `v5e:2x4`, `v5e:16x16`, `v6e:8x16`, `v4:4x4x8`, `v5:4x4x2` (v5p;
`v5p:` is accepted too), with `Nx` in front for N slices (`2xv5e:16x16`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from qwen_jax.data.pipeline import BATCH_KEYS
from qwen_jax.model.kv_cache import KVCache, cache_logical_axes, init_cache
from qwen_jax.model.transformer import Qwen, abstract_params, param_shardings
from qwen_jax.parallel import sharding as shd
from qwen_jax.train import build as train_build
from qwen_jax.train import roofline

TOPOLOGY_HELP = ("a libtpu topology name such as v5e:2x4, v5e:16x16, v6e:8x16, v4:4x4x8 or "
                 "v5:4x4x2 / v5p:4x4x2, optionally prefixed by a slice count (2xv5e:16x16)")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
GiB = roofline.GiB


class AotError(ValueError):
    """A compile-only request that cannot run (bad topology, mesh that does not divide)."""


@dataclasses.dataclass
class Slice:
    """The compile-only devices of a topology and what each of them is."""
    name: str
    num_slices: int
    devices: list
    chip: roofline.Chip
    devices_per_chip: int

    @property
    def hbm_per_device(self) -> float:
        return self.chip.hbm_bytes / self.devices_per_chip


# ------------------------------------------------------------------------- topology
def parse_topology(name: str, num_slices: int = 1) -> tuple[str, int]:
    """('2xv5p:4x4x2', 1) -> ('v5:4x4x2', 2)."""
    match = re.fullmatch(r"(?:(\d+)x)?(v\d+[a-z]*):(\d+(?:x\d+)+)", name.strip())
    if not match or num_slices < 1:
        raise AotError(f"bad topology {name!r} (num_slices={num_slices}): expected "
                       f"{TOPOLOGY_HELP}")
    prefix, generation, dims = match.groups()
    if prefix and num_slices not in (1, int(prefix)):
        raise AotError(f"topology {name!r} says {prefix} slices but --num-slices={num_slices}")
    generation = "v5" if generation == "v5p" else generation
    return f"{generation}:{dims}", int(prefix or num_slices)


def topology(name: str, num_slices: int = 1) -> Slice:
    from jax.experimental import topologies

    topo_name, slices = parse_topology(name, num_slices)
    # Other processes (tests, a training run) may have libtpu loaded; compiling needs no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topo_name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu raises JaxRuntimeError / RuntimeError with its reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"unknown TPU topology {name!r}: {reason}; expected "
                       f"{TOPOLOGY_HELP}") from None
    devices = list(desc.devices)
    try:
        chip = roofline.chip_for(devices[0].device_kind)
    except ValueError as e:
        raise AotError(f"topology {name!r}: {e}") from None
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    return Slice(topo_name, slices, devices, chip, len(devices) // len(chips))


def topology_mesh(requested, sl: Slice) -> Mesh:
    """The config's (data, fsdp, tensor) mesh per slice; slices stack on 'data' (DCN)."""
    per_slice = len(sl.devices) // sl.num_slices
    try:
        shape = shd.mesh_shape(requested, per_slice)
        if sl.num_slices == 1:
            return shd.make_mesh(shape, sl.devices)
        ordered = sorted(sl.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
        blocks = [shd.make_mesh(shape, ordered[i * per_slice:(i + 1) * per_slice]).devices
                  for i in range(sl.num_slices)]
    except shd.ShardingError as e:
        raise AotError(f"config.mesh on {sl.name} ({per_slice} devices per slice): {e}") \
            from None
    return Mesh(np.concatenate(blocks, axis=0), shd.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shd.MESH_AXES))


# ------------------------------------------------------------------------- compiling
def memory_summary(m) -> dict:
    """Per-device bytes from a compiled program's `memory_analysis()`: its parts and the total
    the program needs (arguments + outputs - aliased + temporaries + code)."""
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temporary": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temporary"] + out["code"]
    return out


def count_collectives(hlo_text: str) -> dict:
    """Collective instructions in an HLO module (async -start/-done pairs count once; an
    instruction inside a loop body counts once however often the loop runs)."""
    found = collections.Counter(_COLLECTIVE_RE.findall(hlo_text))
    return {name: found.get(name, 0) for name in COLLECTIVES}


COST_KEYS = {"flops": "flops", "bytes accessed": "bytes_accessed",
             "optimal_seconds": "optimal_seconds"}


def _cost(compiled) -> dict:
    """XLA's cost analysis of `compiled` (COST_KEYS; NaN where it reports nothing)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {ours: float(cost.get(theirs, float("nan"))) for theirs, ours in COST_KEYS.items()}


def _xla_flops(compiled) -> float | None:
    flops = _cost(compiled)["flops"]
    return flops if math.isfinite(flops) else None


def _compile(lowered, sl: Slice) -> dict:
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the compiler's own verdict (RESOURCE_EXHAUSTED for HBM OOM)
        return {"fits": False, "error": str(e).strip(), "hbm_per_device": sl.hbm_per_device,
                "compile_seconds": round(time.perf_counter() - t0, 1)}
    memory = memory_summary(compiled.memory_analysis())
    result = {"compile_seconds": round(time.perf_counter() - t0, 1), "memory": memory,
              "hbm_per_device": sl.hbm_per_device, "xla_flops_per_device": _xla_flops(compiled),
              "collectives": count_collectives(compiled.as_text())}
    result["fits"] = memory["total"] <= sl.hbm_per_device
    if not result["fits"]:
        result["error"] = (f"total {memory['total'] / GiB:.2f} GiB per device exceeds the "
                           f"{sl.hbm_per_device / GiB:.2f} GiB of HBM")
    return result


def _tpu_model_config(config):
    # "auto" resolves by the host's backend (CPU here); on the TPU it would pick the kernel.
    return config.replace(attention_impl="pallas") if config.attention_impl == "auto" else config


def _lower_train(trainer, batch_size: int, seq_len: int, mesh: Mesh, sl: Slice):
    shape = (batch_size, seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_mask" else jnp.int32,
                                       sharding=trainer.batch_sharding())
             for key in BATCH_KEYS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
    with jax.default_device(sl.devices[0]):
        return trainer.jit_train_step().lower(trainer.abstract_state(), batch, rng)


def lower_train(cfg, mesh: Mesh, sl: Slice):
    """cfg's whole training step, lowered for the slice from shape-only inputs."""
    trainer = train_build.build_trainer(cfg, mesh)
    trainer = dataclasses.replace(trainer, model_config=_tpu_model_config(trainer.model_config))
    return _lower_train(trainer, cfg.global_batch_size, cfg.data.seq_len, mesh, sl)


def compile_train(cfg, mesh: Mesh, sl: Slice) -> dict:
    return _compile(lower_train(cfg, mesh, sl), sl)


# XLA (TPU) turns an FSDP all-gather or reduce-scatter next to a matmul into a loop over the
# shards (a windowed einsum: the matmul in pieces beside collective-permutes); for the cost
# compiles it keeps them whole, so that no loop of its own hides work.
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
_WHILE_RE = re.compile(r"\swhile\(")


def count_loops(hlo_text: str) -> int:
    """While loops in an HLO module."""
    return len(_WHILE_RE.findall(hlo_text))


def compile_loop_free(cfg, mesh: Mesh, sl: Slice, layers: int, microbatches: int, rows: int):
    """cfg's training step compiled with no loops of its own: `layers` layers unrolled,
    `microbatches` microbatches of `rows` sequences unrolled, the loss in one chunk per
    microbatch, windowed einsums off (what `xla_cost` samples)."""
    base = train_build.build_trainer(cfg, mesh)
    trainer = dataclasses.replace(
        base, loss=dataclasses.replace(base.loss, chunk_tokens=rows * cfg.data.seq_len),
        model_config=_tpu_model_config(base.model_config).replace(
            scan_layers=False, num_hidden_layers=layers),
        microbatches=microbatches, unroll_microbatches=True)
    return _lower_train(trainer, rows * microbatches, cfg.data.seq_len, mesh,
                        sl).compile(compiler_options=NO_WINDOWED_EINSUM)


def xla_cost(cfg, mesh: Mesh, sl: Slice) -> dict:
    """XLA's cost analysis of the whole training step, per device.

    XLA counts a loop body once: the layer scan, the microbatch loop and the fused loss's
    chunk loop of the real program, and the loops XLA itself makes of FSDP matmuls
    (windowed einsums), would each be counted as one trip. So the step is compiled four
    times more without loops (layers and microbatches unrolled, the loss in one chunk per
    microbatch, windowed einsums off) at 1 and 2 layers x 2 and 3 microbatches of the real
    microbatch size, and each figure f is extrapolated bilinearly,
    f(L, k) = a + b L + c k + d L k, to the config's L layers and k microbatches: exact,
    since every layer and every microbatch is the same program (the optimizer's cost is in
    a and b, once per step). A one-microbatch step has no gradient accumulator, a program
    of its own: it is compiled at 1 and 2 layers and extrapolated in L alone. The FLOPs are
    the real step's; the bytes leave out that the real loss loop reads the lm_head again for
    each chunk. `loops_left` counts the loops that remain in those programs anyway (0
    expected). `optimal_seconds` is None where XLA's sum is negative (it adds -1 for
    instructions it has no timing model for)."""
    layers, k = train_build.model_config(cfg).num_hidden_layers, cfg.microbatches
    rows = cfg.global_batch_size // k
    points, seconds, loops = {}, 0.0, 0
    k0 = 1 if k == 1 else 2  # the lower microbatch point
    micros = (1,) if k == 1 else (2, 3)
    for n_layers in (1, 2):
        for micro in micros:
            t0 = time.perf_counter()
            compiled = compile_loop_free(cfg, mesh, sl, n_layers, micro, rows)
            seconds += time.perf_counter() - t0
            points[n_layers, micro] = _cost(compiled)
            loops = max(loops, count_loops(compiled.as_text()))
    out = {}
    for key in COST_KEYS.values():
        f = {(n, m - k0): v[key] for (n, m), v in points.items()}  # m - k0: 0 or 1
        if k == 1:
            f[1, 1], f[2, 1] = f[1, 0], f[2, 0]
        d = f[2, 1] - f[2, 0] - f[1, 1] + f[1, 0]
        b = f[2, 0] - f[1, 0]
        c = f[1, 1] - f[1, 0]
        out[key] = f[1, 0] + b * (layers - 1) + c * (k - k0) + d * (layers - 1) * (k - k0)
    negative = any(v["optimal_seconds"] < 0 for v in points.values())
    if negative or not math.isfinite(out["optimal_seconds"]):
        out["optimal_seconds"] = None
    micro_text = "1 microbatch" if k == 1 else "2-3 microbatches"
    out.update(method=f"{len(points)} loop-free compiles (1-2 layers x {micro_text} of {rows} "
                      f"rows), extrapolated to {layers} layers x {k} microbatches",
               loops_left=loops, compile_seconds=round(seconds, 1),
               points={f"{n}x{m}": v for (n, m), v in points.items()})
    return out


def cache_shardings(mesh: Mesh, cache: KVCache) -> KVCache:
    """The shardings of a float `cache` (its logical axes: `cache_logical_axes`)."""
    axes = cache_logical_axes(cache)
    specs = {f.name: shd.logical_to_spec(getattr(axes, f.name))
             for f in dataclasses.fields(KVCache)}
    return KVCache(**{k: NamedSharding(mesh, spec) for k, spec in specs.items()})


def compile_decode(model_config, mesh: Mesh, sl: Slice, batch: int, max_len: int) -> dict:
    """One greedy decoding step of the server's slot cache (`qwen_jax.infer.slots`: every
    row at its own index): [batch, 1] tokens against a cache of max_len, bf16 weights."""
    config = _tpu_model_config(model_config).replace(param_dtype=model_config.dtype,
                                                     remat_policy="none")
    param_sh = param_shardings(config, mesh)
    token_sh = shd.batch_sharding(mesh, 2)
    model = Qwen(config)

    def step(params, tokens, cache):
        logits, cache = model.apply({"params": params}, tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = jax.eval_shape(lambda: init_cache(config, batch, max_len, per_row=True))
    cache_sh = cache_shardings(mesh, cache)
    cache = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                      sharding=sh),
                                   cache, cache_sh)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=token_sh)
    fn = jax.jit(step, in_shardings=(param_sh, token_sh, cache_sh),
                 out_shardings=(shd.batch_sharding(mesh, 1), cache_sh), donate_argnums=(2,))
    with jax.default_device(sl.devices[0]), shd.activation_sharding(mesh):
        lowered = fn.lower(abstract_params(config, param_sh), tokens, cache)
    result = _compile(lowered, sl)
    result.update(batch=batch, cache_len=max_len)
    return result


def default_decode_batch(mesh: Mesh) -> int:
    """At least 8 rows, a multiple of the batch-parallel size (the cache is split over it)."""
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    return parallel * math.ceil(8 / parallel)


# ------------------------------------------------------------------------- the check
def check(cfg, topology_name: str, num_slices: int = 1, decode_batch: int | None = 0,
          with_xla_cost: bool = False) -> dict:
    """Compile cfg's training step (and, unless decode_batch is None, a decode step) for the
    topology; returns the report (see `format_report`). `fits` is False when either does not
    compile or does not fit. `with_xla_cost`: also XLA's cost analysis of the whole step
    (`xla_cost`: four more, small, compiles) and the estimate from it."""
    sl = topology(topology_name, num_slices)
    mesh = topology_mesh(tuple(cfg.mesh), sl)
    model_config = train_build.model_config(cfg)
    report = {
        "topology": sl.name, "num_slices": sl.num_slices, "devices": len(sl.devices),
        "device_kind": sl.devices[0].device_kind, "devices_per_chip": sl.devices_per_chip,
        "chip": sl.chip.generation, "mesh": dict(mesh.shape), "model": cfg.model,
        "params": model_config.num_params(), "seq_len": cfg.data.seq_len,
        "global_batch": cfg.global_batch_size, "microbatches": cfg.microbatches,
        "remat_policy": model_config.remat_policy,
        "attention_impl": _tpu_model_config(model_config).attention_impl,
    }
    report["train"] = compile_train(cfg, mesh, sl)
    if with_xla_cost and report["train"]["fits"]:
        report["xla_cost"] = xla_cost(cfg, mesh, sl)
    report["roofline"] = roofline.estimate(
        model_config, chip=sl.chip, seq_len=cfg.data.seq_len,
        global_batch=cfg.global_batch_size, microbatches=cfg.microbatches,
        mesh=dict(mesh.shape), num_slices=sl.num_slices, devices_per_chip=sl.devices_per_chip,
        xla=report.get("xla_cost"))
    if decode_batch is not None:
        report["decode"] = compile_decode(model_config, mesh, sl,
                                          decode_batch or default_decode_batch(mesh),
                                          cfg.data.seq_len)
    report["fits"] = report["train"]["fits"] and report.get("decode", {}).get("fits", True)
    return report


def _gib(x) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f} MiB"


def _secs(x) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.3f} ms"


def _step_lines(name: str, r: dict) -> list[str]:
    if "memory" not in r:
        return [f"{name}: DOES NOT COMPILE/FIT ({r['compile_seconds']} s):", f"  {r['error']}"]
    m, hbm = r["memory"], r["hbm_per_device"]
    flops_ = r["xla_flops_per_device"]
    lines = [
        f"{name}: compiled in {r['compile_seconds']} s",
        f"  memory per device: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} "
        f"(aliased {_gib(m['alias'])}), temporaries {_gib(m['temporary'])}, code "
        f"{_gib(m['code'])}",
        f"  total {_gib(m['total'])} of {_gib(hbm)} HBM per device "
        f"({100 * m['total'] / hbm:.0f}%): {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  XLA FLOPs per device: {flops_:.3e} (cost_analysis of this program: a loop body "
        "counts once)" if flops_ is not None else "  XLA FLOPs per device: not reported",
        "  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
    ]
    if not r["fits"]:
        lines.append(f"  {r['error']}")
    return lines


def format_report(report: dict) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    est = report["roofline"]
    lines = [
        f"compile-only: {report['model']} ({report['params'] / 1e9:.2f}B params) on "
        f"{report['topology']} x {report['num_slices']} slice(s): {report['devices']} devices "
        f"({report['device_kind']}, {report['devices_per_chip']} per chip), mesh {mesh}",
        f"train step: batch {report['global_batch']} x {report['seq_len']} tokens, "
        f"{report['microbatches']} microbatch(es), remat {report['remat_policy']}, attention "
        f"{report['attention_impl']}",
        *_step_lines("train step", report["train"]),
        f"  model FLOPs per device: {est['model_flops_per_device']:.3e} (executed with remat "
        f"{est['executed_flops_per_device']:.3e})",
        f"  roofline: compute {_secs(est['compute_seconds'])}, communication "
        f"{_secs(est['comm_seconds'])} -> step {_secs(est['step_seconds'])} overlapped "
        f"({_secs(est['serial_step_seconds'])} serial), {est['bound']}-bound",
        f"  estimated MFU {100 * est['mfu']:.1f}% ({100 * est['serial_mfu']:.1f}% serial), "
        f"{est['tokens_per_second']:,.0f} tokens/s (every FLOP at peak, no HBM time)",
    ]
    cost = report.get("xla_cost")
    if cost:
        optimal = cost["optimal_seconds"]
        ratio = cost["flops"] / est["model_flops_per_device"]
        lines += [
            f"  XLA cost_analysis of the whole step ({cost['method']}; "
            f"{cost['compile_seconds']} s)"
            + (f"; {cost['loops_left']} loop(s) of XLA's own left, counted once: an "
               "undercount" if cost["loops_left"] else "") + ":",
            f"    FLOPs {cost['flops']:.3e} per device ({ratio:.2f}x the model FLOPs), bytes "
            f"accessed {cost['bytes_accessed'] / 1e9:,.1f} GB, optimal_seconds "
            + (f"{optimal:.3f}" if optimal is not None else "not modelled (negative sum)"),
            f"    -> FLOPs at peak {_secs(est['xla_compute_seconds'])}, bytes at HBM bandwidth "
            f"{_secs(est['xla_memory_seconds'])}; step {_secs(est['xla_step_seconds'])} "
            f"(bound: {est['xla_bound']}): estimated MFU {100 * est['xla_mfu']:.1f}%, "
            f"{est['xla_tokens_per_second']:,.0f} tokens/s",
        ]
    if "decode" in report:
        d = report["decode"]
        lines.append(f"decode step: batch {d['batch']}, cache {d['cache_len']} tokens, bf16 "
                     "weights")
        lines += _step_lines("decode step", d)
    lines.append("result: " + ("fits" if report["fits"] else "DOES NOT FIT"))
    return "\n".join(lines)


def write_json(report: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")
