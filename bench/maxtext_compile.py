"""Compile-only MaxText's training step and write what XLA says of it; run by MaxText's own
Python (bench/maxtext_compare.py starts it in MaxText's virtual environment).

    python bench/maxtext_compile.py OUT_PREFIX key=value ...   # MaxText's train_compile keys

It runs MaxText's `train_compile` entry point unchanged (its config, mesh, shardings and
`jit_and_compile`) and keeps the compiled object it makes. Written: OUT_PREFIX.json with
`memory_analysis()` and `cost_analysis()` of the compiled step, and OUT_PREFIX.hlo.txt, the
compiled HLO, so that the caller counts memory and collectives with one formula for both
codebases. Only the standard library and MaxText are imported here.
"""

from __future__ import annotations

import json
import sys
import time

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    prefix, overrides = argv[1], argv[2:]
    from maxtext.trainers.pre_train import train_compile

    captured = {}
    make = train_compile.jit_and_compile

    def keep(*args, **kwargs):
        t0 = time.perf_counter()
        captured["compiled"] = make(*args, **kwargs)
        captured["seconds"] = time.perf_counter() - t0
        return captured["compiled"]

    train_compile.jit_and_compile = keep
    train_compile.main(["train_compile.py", *overrides])
    compiled = captured["compiled"]
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    wanted = ("flops", "bytes accessed", "optimal_seconds")
    result = {"memory": {f: int(getattr(memory, f)) for f in MEMORY_FIELDS},
              "cost": {k: float(cost[k]) for k in wanted if k in cost},
              "compile_seconds": round(captured["seconds"], 1), "overrides": overrides}
    with open(prefix + ".hlo.txt", "w") as f:
        f.write(compiled.as_text())
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
