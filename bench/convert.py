"""Import cost of a released-size checkpoint: wall time and peak host memory of
`convert_hf.py import` on a synthetic checkpoint shaped like Qwen-1.8B (random weights in the
original key layout, bfloat16 as released, sharded with an index).

Peak memory is the import process's peak RSS minus that of a process that only loads the same
modules and starts the JAX CPU backend; the goal is <= 1.3x the parameter bytes written.

    python bench/convert.py [--preset 1_8b] [--dtype bfloat16] [--shard-gb 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_jax.io.convert import INDEX_FILE, hf_config_dict, hf_shapes  # noqa: E402
from qwen_jax.model.config import preset  # noqa: E402

_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
         "stdout=subprocess.DEVNULL); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_synthetic(out: pathlib.Path, config, dtype, shard_bytes: int) -> int:
    """Random original-layout shards, one tensor in memory at a time; returns total bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    shapes = hf_shapes(config)
    shards, used = [[]], 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, names in zip(files, shards):
        tensors = {n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(np_dtype)
                   for n in names}
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors
    total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
    weight_map = {n: files[i] for i, names in enumerate(shards) for n in names}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}))
    cfg = hf_config_dict(config.replace(param_dtype=dtype))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def peak_rss(argv) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, *argv], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1_8b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--keep", default=None, help="work directory to keep (default: temp)")
    args = parser.parse_args()
    config = preset(args.preset)
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="qwen_convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, ckpt = work / "hf", work / "ckpt"
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    hf_dir.mkdir()
    try:
        start = time.perf_counter()
        total = write_synthetic(hf_dir, config, args.dtype, int(args.shard_gb * 2**30))
        print(f"synthetic {args.preset} checkpoint: {total / 2**30:.2f} GiB {args.dtype} in "
              f"{len(list(hf_dir.glob('*.safetensors')))} shards "
              f"(written in {time.perf_counter() - start:.0f}s)")
        baseline = peak_rss([sys.executable, "-c", "import convert_hf, qwen_jax.io.convert, "
                                   "qwen_jax.io.checkpoint, jax; jax.devices()"])
        start = time.perf_counter()
        peak = peak_rss([sys.executable, str(ROOT / "convert_hf.py"), "import", str(hf_dir),
                         str(ckpt)])
        seconds = time.perf_counter() - start
        ratio = (peak - baseline) / total
        print("| parameters | import wall s | peak RSS | baseline RSS | (peak - baseline) / "
              "params |")
        print("|---|---|---|---|---|")
        print(f"| {total / 2**30:.2f} GiB | {seconds:.1f} | {peak / 2**30:.2f} GiB | "
              f"{baseline / 2**30:.2f} GiB | {ratio:.2f}x |")
        print(f"goal <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
