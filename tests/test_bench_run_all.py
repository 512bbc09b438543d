"""bench/run_all.py keeps what it did not run: other benchmarks' sections and hand-written
ones, in their places."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_partial_run_keeps_every_other_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nintro\n\n"
                    "## Memory notes (by hand)\n\nkept as written\n\n"
                    "## Serving: continuous batching vs one request at a time (CPU)\n\nold\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--only", "",
                           "--out", str(page)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    serving = text.index("## Serving: continuous batching")
    notes = text.index("## Memory notes (by hand)\n\nkept as written\n")
    assert serving < notes  # the benchmarks' own order first, then the others
    assert text.count("## ") == 2
