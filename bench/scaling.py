"""Smallest TPU slice per model and chip for the report's 4M-token batch (2048 x 2048),
found by compiling on this CPU host with libtpu (`train.py --compile-only`), written to
docs/scaling.md.

    python bench/scaling.py [--models 1_8b,7b,14b,72b] [--chips v5p,v5e,v6e,v4]
                            [--budget-minutes 40] [--timeout 900]

--models / --chips choose what may be compiled; the table lists every model and chip (the
others from the cache).

For each (model, chip) it walks slice sizes from small to large. At each size the options
(mesh tensor width: 1 or the config's; remat: minimal or full; microbatches 1..32) are ranked
by the roofline MFU of qwen_jax/train/roofline.py; an analytic memory estimate (optimizer state,
saved activations, float32 logits) drops options that cannot fit; the best-ranked remaining
option is compiled, then, if it does not fit, the leanest one. The first size with a fitting option
is the answer (sizes below the first one whose leanest option's estimate fits are not
compiled). Every compile's result is cached in docs/scaling.json, so a re-run only
compiles what is missing; a run stops starting compiles after --budget-minutes and the
document says which cells were not reached.
"""

from __future__ import annotations

import argparse
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

from qwen_jax.model.config import preset  # noqa: E402
from qwen_jax.train import roofline  # noqa: E402

CACHE = ROOT / "docs" / "scaling.json"
DOC = ROOT / "docs" / "scaling.md"
GiB = roofline.GiB
# (chips, libtpu topology) from small to large; v5p is "v5" in libtpu.
SLICES = {
    "v5e": [(4, "v5e:2x2"), (8, "v5e:2x4"), (16, "v5e:4x4"), (32, "v5e:4x8"), (64, "v5e:8x8"),
            (128, "v5e:8x16"), (256, "v5e:16x16")],
    "v6e": [(4, "v6e:2x2"), (8, "v6e:2x4"), (16, "v6e:4x4"), (32, "v6e:4x8"), (64, "v6e:8x8"),
            (128, "v6e:8x16"), (256, "v6e:16x16")],
    "v5p": [(4, "v5:2x2x1"), (8, "v5:2x2x2"), (16, "v5:2x2x4"), (32, "v5:4x4x2"),
            (64, "v5:4x4x4"), (128, "v5:4x4x8"), (256, "v5:4x8x8"), (512, "v5:8x8x8")],
    "v4": [(4, "v4:2x2x1"), (8, "v4:2x2x2"), (16, "v4:2x2x4"), (32, "v4:2x4x4"),
           (64, "v4:4x4x4"), (128, "v4:4x4x8"), (256, "v4:4x8x8"), (512, "v4:8x8x8")],
}
DEVICES_PER_CHIP = {"v4": 2}  # v4's compile-only topology has one device per TensorCore
BATCH, SEQ = 2048, 2048
ALL_MODELS, ALL_CHIPS = "1_8b,7b,14b,72b", "v5p,v5e,v6e,v4"


def load_config(model: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{model}", ROOT / "configs" / f"{model}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def estimate_memory(config, devices: int, tensor: int, micro: int) -> float:
    """Per-device bytes: float32 params, Adam moments and gradient accumulator; saved
    activations (the float32 residual per layer under full remat, plus the saved matmul
    outputs in bf16 under minimal); float32 logits and their gradient."""
    h, f, v, n_layers = (config.hidden_size, config.mlp_width, config.vocab_size,
                         config.num_hidden_layers)
    tokens = BATCH // micro // (devices // tensor) * SEQ
    state = 16 * config.num_params() / devices
    per_token = 4 * h + (0 if config.remat_policy == "full" else 2 * (4 * h + 3 * f) / tensor)
    return state + n_layers * tokens * per_token + 2 * tokens * v / tensor * 4


def options(model: str, chip: str, devices: int):
    """(estimated MFU, estimated bytes, mesh, remat, microbatches), best MFU first."""
    cfg = load_config(model)
    out = []
    for tensor in sorted({1, cfg.mesh[2]}):
        if devices % tensor:
            continue
        for remat in ("minimal", "full"):
            config = preset(model, remat_policy=remat)
            for micro in (1, 2, 4, 8, 16, 32):
                dp = devices // tensor
                if BATCH % micro or (BATCH // micro) % dp:
                    continue
                mesh = {"data": 1, "fsdp": dp, "tensor": tensor}
                est = roofline.estimate(
                    config, chip=roofline.CHIPS[chip], seq_len=SEQ, global_batch=BATCH,
                    microbatches=micro, mesh=mesh,
                    devices_per_chip=DEVICES_PER_CHIP.get(chip, 1))
                out.append((est["mfu"], estimate_memory(config, devices, tensor, micro),
                            (1, -1, tensor), remat, micro))
    return sorted(out, key=lambda o: (-round(o[0], 3), o[4]))


def compile_one(model, topology, mesh, remat, micro, timeout) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.json"
        cmd = [sys.executable, "train.py", "--config", f"configs/{model}.py", "--compile-only",
               "--topology", topology, f"--config.mesh={mesh}",
               f"--config.model_overrides.remat_policy={remat}",
               f"--config.microbatches={micro}", "--decode-batch=-1", "--noxla_cost",
               "--report-json", str(report)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "seconds": round(time.time() - t0)}
        seconds = round(time.time() - t0)
        if not report.exists():
            err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            return {"status": "error", "seconds": seconds,
                    "error": (err or proc.stderr.splitlines()[-1:] or ["?"])[0][:300]}
        r = json.loads(report.read_text())
    train = r["train"]
    out = {"status": "fits" if r["fits"] else "oom", "seconds": seconds,
           "hbm": train.get("hbm_per_device"), "mfu": r["roofline"]["mfu"],
           "devices_per_chip": r["devices_per_chip"]}
    if "memory" in train:
        out["total"] = train["memory"]["total"]
    if not r["fits"]:
        out["error"] = train["error"].splitlines()[0][:300]
    return out


def search(model, chip, cache, args, deadline) -> dict:
    for chips, topology in SLICES[chip]:
        devices = chips * DEVICES_PER_CHIP.get(chip, 1)
        hbm = roofline.CHIPS[chip].hbm_bytes / DEVICES_PER_CHIP.get(chip, 1)
        candidates = [o for o in options(model, chip, devices) if o[1] <= hbm]
        if not candidates:
            continue  # even the leanest option's estimate exceeds HBM: next size
        # the best estimated MFU first, then the leanest (does this size fit at all?)
        leanest = min(candidates, key=lambda o: o[1])
        tries = candidates[:max(args.tries - 1, 1)] + [leanest]
        for mfu, _, mesh, remat, micro in dict.fromkeys(tries):
            key = f"{model}|{topology}|{mesh}|{remat}|{micro}"
            if key not in cache:
                if time.time() > deadline:
                    return {"status": "budget", "topology": topology, "chips": chips}
                print(f"compiling {key} ...", flush=True)
                cache[key] = compile_one(model, topology, mesh, remat, micro, args.timeout)
                print(f"  {cache[key]}", flush=True)
                CACHE.write_text(json.dumps(cache, indent=1) + "\n")
            if cache[key]["status"] == "fits":
                return {"status": "fits", "topology": topology, "chips": chips, "mesh": mesh,
                        "remat": remat, "micro": micro, **cache[key]}
    return {"status": "none"}


def roofline_mfu(model, chip, r) -> float:
    """The roofline MFU of a fitting row, from the current roofline (not the cached one)."""
    tensor = r["mesh"][2]  # search() gives the mesh as (data, fsdp, tensor)
    devices = r["chips"] * DEVICES_PER_CHIP.get(chip, 1)
    mesh = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
    return roofline.estimate(preset(model, remat_policy=r["remat"]), chip=roofline.CHIPS[chip],
                             seq_len=SEQ, global_batch=BATCH, microbatches=r["micro"],
                             mesh=mesh, devices_per_chip=DEVICES_PER_CHIP.get(chip, 1))["mfu"]


def write_doc(rows, cache, command, seconds):
    lines = [
        "# Scaling: compile-only checks and the smallest TPU slice per model", "",
        "Whether a config fits a TPU slice, and how fast it would run there, is found on a CPU "
        "host by compiling for the slice with libtpu. The training configs are in "
        "[training.md](training.md), alignment's four-model step in "
        "[alignment.md](alignment.md).", "",
        kept_sections(LEADING).strip(), "",
        "## Smallest slice per model", "",
        "Generated by `bench/scaling.py` from real libtpu compiles of the training step on a "
        "CPU host (`train.py --compile-only`); the report's batch of 2048 x 2048 tokens, "
        "bf16 compute over float32 master weights and Adam state, Pallas attention.", "",
        f"Command: `{command}`; this invocation took {seconds / 60:.1f} min on 2 CPU cores "
        f"({time.strftime('%Y-%m-%d')}). "
        f"The {len(cache)} compiles cached in `docs/scaling.json` (not redone on a re-run) "
        f"took {sum(r['seconds'] for r in cache.values()) / 60:.0f} min in all, each 1-4 min "
        "and 1-3 GB of host RAM for these models.", "",
        "Memory is the compiler's per-device total (arguments + outputs - aliased + "
        "temporaries + code) against the chip's HBM; MFU is the roofline estimate of "
        "`qwen_jax/train/roofline.py` (every FLOP at peak, FSDP traffic overlapped with "
        "compute, tensor-parallel all-reduces added to the step; an upper bound, not a "
        "measurement; `train.py --compile-only` also prints the estimate from XLA's own cost "
        "analysis). On v4 the compile-only topology has one device per TensorCore (2 per "
        "chip), so the memory is per TensorCore against half the chip's 32 GiB. Sizes "
        "below the first one whose leanest option fits by the analytic estimate in "
        "`bench/scaling.py` are not compiled.", "",
        "| model | chip | smallest slice | chips | mesh (data, fsdp, tensor) | remat | "
        "microbatches | memory per device | est. MFU | compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, chip), r in rows:
        if r["status"] == "fits":
            lines.append(
                f"| {model} | {chip} | {r['topology']} | {r['chips']} | {r['mesh']} | "
                f"{r['remat']} | {r['micro']} | {r['total'] / GiB:.1f} / {r['hbm'] / GiB:.1f} "
                f"GiB | {100 * roofline_mfu(model, chip, r):.0f}% | {r['seconds']} s |")
        elif r["status"] == "budget":
            lines.append(f"| {model} | {chip} | not reached: the time budget ran out at "
                         f"{r['topology']} | | | | | | | |")
        else:
            lines.append(f"| {model} | {chip} | none of the sizes tried fits | | | | | | | |")
    lines += ["", "## Every compile", "",
              "| model | topology | mesh | remat | microbatches | result | memory per device "
              "| compile |", "|---|---|---|---|---|---|---|---|"]
    for key, r in cache.items():
        model, topology, mesh, remat, micro = key.split("|")
        memory = (f"{r['total'] / GiB:.1f} / {r['hbm'] / GiB:.1f} GiB" if "total" in r else "")
        result = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {model} | {topology} | {mesh} | {remat} | {micro} | "
                     f"{result.replace('|', '/')} | {memory} | {r['seconds']} s |")
    DOC.write_text("\n".join(lines) + "\n" + kept_sections())


GENERATED = ("## Smallest slice per model", "## Every compile")
LEADING = ("## Compile-only checks",)  # kept, and placed before the generated sections


def kept_sections(which: tuple[str, ...] | None = None) -> str:
    """The sections of the current document this script does not write: those starting with
    one of `which`, or (None) every other one (e.g. the PPO compiles), kept after the
    generated ones."""
    if not DOC.exists():
        return ""
    parts = [f"## {part}" for part in DOC.read_text().split("\n## ")[1:]]
    if which is None:
        return "".join("\n" + part for part in parts
                       if not any(part.startswith(g) for g in GENERATED + LEADING))
    return "".join("\n" + part for part in parts if any(part.startswith(g) for g in which))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=ALL_MODELS)
    parser.add_argument("--chips", default=ALL_CHIPS)
    parser.add_argument("--budget-minutes", type=float, default=40)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per compile")
    parser.add_argument("--tries", type=int, default=2, help="compiles per slice size")
    args = parser.parse_args()
    start = time.time()
    deadline = start + 60 * args.budget_minutes
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    # Every model and chip gets its row (the table always lists them all); only the ones
    # asked for may compile, the others come from the cache.
    wanted = {(m, c) for m in args.models.split(",") for c in args.chips.split(",")}
    rows = [((model, chip), search(model, chip, cache, args,
                                   deadline if (model, chip) in wanted else 0))
            for model in ALL_MODELS.split(",") for chip in ALL_CHIPS.split(",")]
    command = "python bench/scaling.py " + " ".join(sys.argv[1:])
    write_doc(rows, cache, command.strip(), time.time() - start)
    print(DOC.read_text())


if __name__ == "__main__":
    main()
