"""The summary that ends bench/gpu_check.sh: each part ok or failed, the pallas vs cuDNN
attention ratio at one sequence length, the training step's tokens/s and MFU.

    python bench/gpu_check_summary.py OUT_DIR --status tests=0 --status attention=0 \
        --status train_step=124 --timeout train_step=190 --ratio-seq 8192

Reads OUT_DIR/tests.log (pytest's closing line), OUT_DIR/attention.json (bench/attention.py
--json) and OUT_DIR/train_step.json (bench/gpu_train_step.py --json); standard library only
(it runs on the GPU image's python before anything else is known to work). Prints the summary,
writes it to OUT_DIR/summary.txt and exits 0 when every part is ok, else 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

PARTS = ("tests", "attention", "train_step")


def _load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _exit_note(rc: int | None, timeout: str | None) -> str:
    if rc is None:
        return "did not run"
    if rc in (124, 137):
        return f"timed out after {timeout or '?'} s"
    return f"exit code {rc}"


def tests_part(out: pathlib.Path, rc, timeout):
    closing = ""
    try:
        lines = (out / "tests.log").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|skipped)", line) or "no tests ran" in line:
            closing = line.strip(" =")
            break
    ok = rc == 0 and "passed" in closing
    detail = closing or "no pytest summary line"
    return ok, detail if ok else f"{_exit_note(rc, timeout)}; {detail}"


def _is_baseline(impl: str) -> bool:
    return impl.startswith("jax.nn.dpa")


def attention_part(out: pathlib.Path, rc, timeout, ratio_seq: int):
    report = _load(out / "attention.json")
    if report is None:
        return False, f"{_exit_note(rc, timeout)}; no attention.json", None
    rows = report.get("rows", [])
    bad = [f"{r['impl']}@{r['seq']}: {r.get('fwd_error') or r.get('fwd_bwd_error')}"
           for r in rows if "fwd_error" in r or "fwd_bwd_error" in r]
    at = {("pallas" if r["impl"] == "pallas" else "baseline" if _is_baseline(r["impl"])
           else r["impl"]): r for r in rows if r["seq"] == ratio_seq}
    ratio_line = None
    pallas, base = at.get("pallas"), at.get("baseline")
    if pallas and base and "fwd_ms" in pallas and "fwd_ms" in base:
        parts = [f"fwd {base['fwd_ms'] / pallas['fwd_ms']:.2f}x"]
        if "fwd_bwd_ms" in pallas and "fwd_bwd_ms" in base:
            parts.append(f"fwd+bwd {base['fwd_bwd_ms'] / pallas['fwd_bwd_ms']:.2f}x")
        ratio_line = (f"attention ratio at seq {ratio_seq}: {', '.join(parts)} "
                      f"({base['impl']} time / pallas time; >= 1.00x: pallas at least as fast)")
    cells = []
    for r in rows:
        if "fwd_ms" in r and "fwd_bwd_ms" in r:
            cells.append(f"{r['impl']}@{r['seq']} {r['fwd_ms']:.2f}/{r['fwd_bwd_ms']:.2f} ms")
    ok = rc == 0 and not bad and ratio_line is not None
    detail = "; ".join(cells) or "no rows"
    if not ok:
        why = [] if rc == 0 else [_exit_note(rc, timeout)]
        why += bad
        if ratio_line is None:
            why.append(f"no pallas and jax.nn.dpa rows at seq {ratio_seq}")
        detail = "; ".join(why) + f" (rows: {detail})"
    return ok, f"fwd/fwd+bwd {detail}" if ok else detail, ratio_line


def train_part(out: pathlib.Path, rc, timeout):
    report = _load(out / "train_step.json")
    if report is None:
        return False, f"{_exit_note(rc, timeout)}; no train_step.json"
    cells, losses = [], {}
    for r in report.get("results", []):
        if "step_s" in r:
            cells.append(f"{r['impl']} {r['tokens_per_s']:,.0f} tokens/s, MFU "
                         f"{100 * r['mfu']:.1f}% (batch {r['batch']} x {r['seq']})")
            losses[r["impl"]] = r["first_loss"]
        elif "skipped" in r:
            cells.append(f"{r['impl']} skipped ({r['skipped']})")
        else:
            cells.append(f"{r['impl']} error ({r.get('error', '?')[:200]})")
    if len(losses) > 1:
        cells.append("first-step loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    ok = rc == 0 and "pallas" in losses
    detail = "; ".join(cells) or "no results"
    return ok, detail if ok else f"{_exit_note(rc, timeout)}; {detail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--status", action="append", default=[], help="PART=exit code")
    parser.add_argument("--timeout", action="append", default=[], help="PART=seconds")
    parser.add_argument("--ratio-seq", type=int, default=8192)
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    status = {k: int(v) for k, v in (s.split("=", 1) for s in args.status)}
    timeouts = dict(s.split("=", 1) for s in args.timeout)

    results = {}
    results["tests"] = tests_part(out, status.get("tests"), timeouts.get("tests"))
    ok, detail, ratio_line = attention_part(out, status.get("attention"),
                                            timeouts.get("attention"), args.ratio_seq)
    results["attention"] = (ok, detail)
    results["train_step"] = train_part(out, status.get("train_step"), timeouts.get("train_step"))

    lines = [f"== gpu_check summary ({args.mode}) =="]
    for part in PARTS:
        ok, detail = results[part]
        lines.append(f"{part}: {'ok' if ok else 'failed'} - {detail}")
    lines.append(ratio_line or f"attention ratio at seq {args.ratio_seq}: not measured")
    passed = sum(ok for ok, _ in results.values())
    lines.append(f"gpu_check: {'PASS' if passed == len(PARTS) else 'FAIL'} "
                 f"({passed} of {len(PARTS)} parts ok)")
    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return 0 if passed == len(PARTS) else 1


if __name__ == "__main__":
    sys.exit(main())
