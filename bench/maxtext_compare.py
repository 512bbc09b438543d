"""Qwen-14B's training step compiled for one TPU slice by qwen_jax and by MaxText, side by
side (compile-only: libtpu's compiler on this CPU host, no TPU).

    python bench/maxtext_compare.py --maxtext-python MAXTEXT_VENV/bin/python
                                    [--topology v5:2x4x4] [--out docs/maxtext_compare.json]
    MAXTEXT_PYTHON=MAXTEXT_VENV/bin/python python bench/run_all.py --only maxtext
    python bench/maxtext_compare.py --from-json docs/maxtext_compare.json   # the table again

MaxText needs Python >= 3.12 and its own environment, with the JAX and libtpu we use:

    pythonX.Y -m venv MAXTEXT_VENV     # X.Y >= 3.12
    MAXTEXT_VENV/bin/pip install "maxtext[tpu]==0.2.4" jax==0.10.2 jaxlib==0.10.2 \\
        libtpu==0.0.42.1

Both compile the same work: Qwen-14B (hidden 5120, 40 layers of 40 query and 40 key/value
heads of 128 with QKV bias, MLP 13696, vocabulary 152064, untied embeddings), float32 weights
and bfloat16 compute, AdamW, 2048 sequences of 2048 tokens as 8 microbatches of 8 sequences
per device, full remat, FSDP over the whole slice, flash attention. MaxText is run through its
own `train_compile` entry point (bench/maxtext_compile.py, in MaxText's interpreter); ours is
`configs/14b.py`. The comparisons, one formula for both:

1. The real step (layer scan, microbatch loop): per-device memory (arguments + outputs -
   aliased + temporaries + code), the collectives in the compiled program, and XLA's
   `cost_analysis()` of it, in which every loop body counts once.
2. XLA's estimate of the whole step, from loop-free compiles: layers unrolled (MaxText
   `scan_layers=false`, ours `scan_layers=False`), one microbatch, FSDP's windowed einsums
   off, at 1 and 2 layers and at 8 and 16 sequences per device. Each figure f is
   f(L, B) = a + b L + c B + d L B, exact in the layers (every layer is the same program) and
   in FLOPs linear in the batch; it is evaluated at L = 40 for one microbatch of 8 (B = 8) and
   for the real step, a + b L + 8 (c + d L) 8: the optimizer once and 8 microbatches of 8 (the
   gradient accumulator's add is not in it, for either). d alone is one layer's work for one
   sequence.
3. XLA counts a custom call (a Pallas kernel) only by the cost it declares. Our attention
   kernels declare theirs; MaxText's splash kernels (jax's own) declare none, so their FLOPs
   and time are missing from MaxText's figures. Ours are estimated again with our kernels'
   declarations removed: like for like, attention left out on both sides (the kernels
   themselves are compared on hardware by bench/attention.py).

`--reuse` takes an earlier run's JSON and compiles only what it lacks; `--from-json` prints
the table of an earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from qwen_jax.kernels import flash_attention_tpu  # noqa: E402
from qwen_jax.train import aot  # noqa: E402

GiB = aot.GiB
LAYERS, MICRO_PER_DEVICE, MICROBATCHES = 40, 8, 8
# MaxText's names for the libtpu topologies it may be compared on.
MAXTEXT_TOPOLOGY = {"v5:2x4x4": "v5p-64", "v5:2x2x2": "v5p-16", "v5:2x2x4": "v5p-32",
                    "v5:4x4x4": "v5p-128"}
# Qwen-14B in MaxText's terms (its qwen2 decoder block: QKV bias, SwiGLU, RMSNorm, RoPE).
MAXTEXT_MODEL = [
    "decoder_block=qwen2", "base_emb_dim=5120", "base_num_query_heads=40",
    "base_num_kv_heads=40", "head_dim=128", "base_mlp_dim=13696", "vocab_size=152064",
    "attention_bias=true", "logits_via_embedding=false", "normalization_layer_epsilon=1e-6",
    "rope_max_timescale=10000", "max_target_length=2048", "remat_policy=full",
    "ici_fsdp_parallelism=-1", "attention=flash", "dtype=bfloat16", "weight_dtype=float32",
    "dataset_type=synthetic", "enable_checkpointing=false", "run_name=qwen14b_compare",
]
NO_WINDOWED_EINSUM_FLAGS = " ".join(f"--{k}=false" for k in aot.NO_WINDOWED_EINSUM)


def load_config():
    spec = importlib.util.spec_from_file_location("cfg_14b", ROOT / "configs" / "14b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def maxtext(python: str, topology: str, overrides: list[str], workdir: pathlib.Path,
            name: str) -> dict:
    """One MaxText compile in its own interpreter: memory, XLA cost, collectives, loops."""
    prefix = workdir / name
    cmd = [python, str(ROOT / "bench" / "maxtext_compile.py"), str(prefix),
           f"compile_topology={topology}", "compile_topology_num_slices=1", *MAXTEXT_MODEL,
           *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"MaxText compile {name} failed (exit {proc.returncode}):\n"
                 f"{proc.stderr[-4000:]}")
    out = json.loads(prefix.with_suffix(".json").read_text())
    hlo = (workdir / f"{name}.hlo.txt").read_text()
    m = out["memory"]
    memory = aot.memory_summary(argparse.Namespace(**m))
    cost = {aot.COST_KEYS[k]: v for k, v in out["cost"].items()}
    print(f"  maxtext {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"memory": memory, "cost": cost, "collectives": aot.count_collectives(hlo),
            "loops": aot.count_loops(hlo), "compile_seconds": out["compile_seconds"]}


@contextlib.contextmanager
def attention_cost_undeclared():
    """Our TPU attention kernels declare no cost to XLA, as MaxText's splash kernels do not
    (XLA counts a custom call only by what it declares)."""
    saved = flash_attention_tpu._cost
    flash_attention_tpu._cost = lambda *args, **kwargs: None
    try:
        yield
    finally:
        flash_attention_tpu._cost = saved


def ours(cfg, topology: str, *, layers: int | None = None, loop_free: bool = False,
         declare_attention_cost: bool = True) -> dict:
    """One of our compiles of cfg's step: memory, XLA cost, collectives, loops."""
    if not declare_attention_cost:
        with attention_cost_undeclared():
            return ours(cfg, topology, layers=layers, loop_free=loop_free)
    sl = aot.topology(topology)
    mesh = aot.topology_mesh(tuple(cfg.mesh), sl)
    t0 = time.perf_counter()
    if loop_free:  # one microbatch of the whole batch
        compiled = aot.compile_loop_free(cfg, mesh, sl, layers, 1, cfg.global_batch_size)
    else:
        compiled = aot.lower_train(cfg, mesh, sl).compile()
    hlo = compiled.as_text()
    seconds = time.perf_counter() - t0
    print(f"  qwen_jax {'loop-free' if loop_free else 'real'} {layers or ''}: {seconds:.0f} s",
          flush=True)
    return {"memory": aot.memory_summary(compiled.memory_analysis()),
            "cost": aot._cost(compiled), "collectives": aot.count_collectives(hlo),
            "loops": aot.count_loops(hlo), "compile_seconds": round(seconds, 1)}


def coefficients(f: dict) -> tuple[float, float, float, float]:
    """(a, b, c, d) of f(L, B) = a + b L + c B + d L B from f at L = 1, 2 and B = 8, 16."""
    d = (f[2, 16] - f[1, 16] - f[2, 8] + f[1, 8]) / 8  # per layer and sequence
    b = f[2, 8] - f[1, 8] - 8 * d  # per layer, not per sequence (its optimizer update)
    c = (f[1, 16] - f[1, 8]) / 8 - d  # per sequence outside the layers
    a = f[1, 8] - b - 8 * c - 8 * d  # the rest: the other parameters' update, fixed costs
    return a, b, c, d


def extrapolate(points: dict) -> dict:
    """points[(layers, per-device batch)] = cost -> the step at 40 layers: one microbatch of
    8 sequences per device, and 8 microbatches of 8 (the optimizer once); and the per-layer,
    per-sequence part alone (`layer_sequence`)."""
    out = {"one_microbatch": {}, "whole_step": {}, "layer_sequence": {}}
    for key in aot.COST_KEYS.values():
        a, b, c, d = coefficients({lb: v[key] for lb, v in points.items()})
        out["layer_sequence"][key] = d
        per_micro = MICRO_PER_DEVICE * (c + d * LAYERS)
        out["one_microbatch"][key] = a + b * LAYERS + per_micro
        out["whole_step"][key] = a + b * LAYERS + MICROBATCHES * per_micro
    return out


def model_flops_per_device(devices: int) -> float:
    """MaxText's count: 6 x matmul parameters per token (lm_head included) + causal attention
    at half, for the 4M-token step, per device."""
    h, f, v, heads, dh, seq = 5120, 13696, 152064, 40, 128, 2048
    per_layer = 4 * h * heads * dh + 3 * h * f
    tokens = 2048 * seq
    matmul = 6 * tokens * (LAYERS * per_layer + h * v)
    attention = 6 * tokens * LAYERS * 2 * seq * heads * dh / 2
    return (matmul + attention) / devices


def table(results: dict, devices: int) -> str:
    q, m = results["qwen_jax"], results["maxtext"]
    rows = [("| | qwen_jax | MaxText 0.2.4 | ours / MaxText |", "|---|---|---|---|")]

    def row(name, a, b, fmt):
        rows.append((f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.3f} |",))

    gib = lambda x: f"{x / GiB:.2f} GiB"
    row("real step: total memory per device", q["real"]["memory"]["total"],
        m["real"]["memory"]["total"], gib)
    row("real step: temporaries", q["real"]["memory"]["temporary"],
        m["real"]["memory"]["temporary"], gib)
    row("real step: arguments", q["real"]["memory"]["argument"],
        m["real"]["memory"]["argument"], gib)
    for key, label, fmt in (("flops", "FLOPs", lambda x: f"{x:.4e}"),
                            ("bytes_accessed", "bytes accessed", lambda x: f"{x / 1e9:,.1f} GB"),
                            ("optimal_seconds", "optimal_seconds", lambda x: f"{x:.4f} s")):
        row(f"real step, loop bodies once: {label}", q["real"]["cost"][key],
            m["real"]["cost"][key], fmt)
    for scope, label in (("one_microbatch", "one microbatch of 8 per device"),
                         ("whole_step", "whole step (8 x 8 per device)")):
        for key, name, fmt in (("flops", "FLOPs", lambda x: f"{x:.4e}"),
                               ("bytes_accessed", "bytes accessed",
                                lambda x: f"{x / 1e9:,.1f} GB"),
                               ("optimal_seconds", "optimal_seconds", lambda x: f"{x:.3f} s")):
            row(f"loop-free estimate, {label}: {name}", q["estimate"][scope][key],
                m["estimate"][scope][key], fmt)
    for key, name, fmt in (("flops", "FLOPs", lambda x: f"{x:.4e}"),
                           ("bytes_accessed", "bytes accessed", lambda x: f"{x / 1e9:,.2f} GB"),
                           ("optimal_seconds", "optimal_seconds",
                            lambda x: f"{x * 1e3:.2f} ms")):
        row(f"of which one layer for one sequence: {name}", q["estimate"]["layer_sequence"][key],
            m["estimate"]["layer_sequence"][key], fmt)
    u = results.get("qwen_jax_attention_undeclared")
    if u:  # like for like: neither side's attention kernels counted
        for scope, label in (("whole_step", "whole step"),
                             ("layer_sequence", "one layer for one sequence")):
            for key, name, fmt in (("flops", "FLOPs", lambda x: f"{x:.4e}"),
                                   ("bytes_accessed", "bytes accessed",
                                    lambda x: f"{x / 1e9:,.2f} GB"),
                                   ("optimal_seconds", "optimal_seconds",
                                    lambda x: f"{x:.3f} s" if x > 1 else f"{x * 1e3:.2f} ms")):
                row(f"attention kernels undeclared (as MaxText's), {label}: {name}",
                    u["estimate"][scope][key], m["estimate"][scope][key], fmt)
    model = model_flops_per_device(devices)
    rows.append((f"| model FLOPs per device (MaxText's count) | {model:.4e} | {model:.4e} | |",))
    for who in (q, m):
        est = who["estimate"]["whole_step"]
        who["flops_over_model"] = est["flops"] / model
    rows.append((f"| XLA FLOPs / model FLOPs, whole step | {q['flops_over_model']:.3f} | "
                 f"{m['flops_over_model']:.3f} | |",))
    coll = lambda r: ", ".join(f"{k} {v}" for k, v in r["collectives"].items() if v)
    rows.append((f"| real step: collectives in the program | {coll(q['real'])} | "
                 f"{coll(m['real'])} | |",))
    loops = lambda r: max(p["loops"] for p in r["points"].values())
    rows.append((f"| while loops left in the loop-free compiles | {loops(q)} | {loops(m)} | |",))
    return "\n".join(r[0] for r in rows)


def compile_all(maxtext_python: str, topology: str, cache: dict | None = None) -> dict:
    """Every compile of both: the real step and the four loop-free points each, and ours
    again with the attention kernels' cost undeclared. `cache`: an earlier run's results for
    the same topology; what it holds is not compiled again."""
    mt_topology = MAXTEXT_TOPOLOGY[topology]
    devices = len(aot.topology(topology).devices)
    results = {"topology": topology, "maxtext_topology": mt_topology, "devices": devices}
    if cache and cache.get("topology") != topology:
        cache = None
    cache = cache or {}

    def get(who, name, compile_fn):
        entries = results.setdefault(who, {"points": {}})
        target = entries if name == "real" else entries["points"]
        old = cache.get(who, {})
        old = old.get("real") if name == "real" else old.get("points", {}).get(name)
        target[name] = old if old is not None else compile_fn()

    grid = [(layers, batch) for layers in (1, 2) for batch in (8, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        real = [f"base_num_decoder_layers={LAYERS}", f"per_device_batch_size={MICRO_PER_DEVICE}",
                f"gradient_accumulation_steps={MICROBATCHES}"]
        get("maxtext", "real", lambda: maxtext(maxtext_python, mt_topology, real, work, "real"))
        for layers, batch in grid:
            over = ["scan_layers=false", "gradient_accumulation_steps=1",
                    f"per_device_batch_size={batch}", f"base_num_decoder_layers={layers}",
                    f"compile_xla_flags={NO_WINDOWED_EINSUM_FLAGS}"]
            get("maxtext", f"{layers}x{batch}", lambda: maxtext(
                maxtext_python, mt_topology, over, work, f"l{layers}b{batch}"))
    cfg = load_config()
    assert cfg.global_batch_size == MICROBATCHES * MICRO_PER_DEVICE * devices, cfg
    get("qwen_jax", "real", lambda: ours(cfg, topology))
    for who, declared in (("qwen_jax", True), ("qwen_jax_attention_undeclared", False)):
        for layers, batch in grid:
            one = load_config()
            one.microbatches, one.global_batch_size = 1, batch * devices
            get(who, f"{layers}x{batch}", lambda: ours(
                one, topology, layers=layers, loop_free=True, declare_attention_cost=declared))
    return results


def report(results: dict) -> str:
    """The estimates from the compiles' figures, the table and the goals."""
    for who in ("qwen_jax", "maxtext", "qwen_jax_attention_undeclared"):
        if who in results:
            r = results[who]
            r["estimate"] = extrapolate({tuple(map(int, lb.split("x"))): v["cost"]
                                         for lb, v in r["points"].items()})
    q, m = results["qwen_jax"], results["maxtext"]
    step = lambda r: r["estimate"]["whole_step"]["optimal_seconds"]  # noqa: E731
    memory = q["real"]["memory"]["total"] / m["real"]["memory"]["total"]
    verdict = lambda x: "met" if x <= 1 else "not met"  # noqa: E731
    lines = [f"Qwen-14B training step on {results['topology']} "
             f"({results['maxtext_topology']}, {results['devices']} chips), per device:",
             table(results, results["devices"]), "",
             f"goal, ours at most MaxText's memory: {memory:.3f}x, {verdict(memory)}",
             f"ours / MaxText estimated step time (loop-free optimal_seconds, whole step): "
             f"{step(q) / step(m):.3f}x with our attention kernels' declared cost"]
    if "qwen_jax_attention_undeclared" in results:
        like = step(results["qwen_jax_attention_undeclared"]) / step(m)
        lines.append(f"goal, ours at most MaxText's estimated step time, like for like (no "
                     f"attention kernel declaring a cost): {like:.3f}x, {verdict(like)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maxtext-python", default=os.environ.get("MAXTEXT_PYTHON"),
                   help="the Python of MaxText's virtual environment (default: $MAXTEXT_PYTHON)")
    p.add_argument("--topology", default="v5:2x4x4", choices=sorted(MAXTEXT_TOPOLOGY))
    p.add_argument("--out", default=str(ROOT / "docs" / "maxtext_compare.json"))
    p.add_argument("--reuse", help="an earlier run's --out: its compiles are not made again")
    p.add_argument("--from-json", help="no compiles: the table from an earlier run's --out")
    args = p.parse_args(argv)
    for flag in ("reuse", "from_json"):
        path = getattr(args, flag)
        if path and not pathlib.Path(path).is_file():
            p.error(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.from_json:
        results = json.loads(pathlib.Path(args.from_json).read_text())
    else:
        if not args.maxtext_python or not pathlib.Path(args.maxtext_python).is_file():
            p.error(f"--maxtext-python {args.maxtext_python}: no such file (MaxText's "
                    "virtual environment's python; see this script's docstring)")
        cache = json.loads(pathlib.Path(args.reuse).read_text()) if args.reuse else None
        results = compile_all(args.maxtext_python, args.topology, cache)
    print(report(results))
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
