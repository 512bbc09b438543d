"""The eval_ppl --plot figure reads well: plain tick labels at exactly the evaluated lengths,
plain perplexities (no scientific notation), the trained length marked, the checkpoint named.

Needs matplotlib (the test extra)."""

import re

import matplotlib
import pytest
from matplotlib import ticker

from qwen_jax.infer import eval_ppl

matplotlib.use("Agg")

LENGTHS = [128, 256, 512, 1024]
# A baseline that blows up past the trained length (log y axis) and rows that stay flat.
BLOW_UP = [("baseline", [9.8, 7.1, 35.2, 260.4]),
           ("dynamic NTK", [9.8, 7.1, 8.9, 14.3]),
           ("dynamic NTK + LogN + window", [9.8, 7.1, 7.5, None])]
# Rows within a factor of 5 of each other (linear y axis).
FLAT = [("baseline", [3.12, 3.05, 3.31, 3.58]), ("dynamic NTK", [3.12, 3.05, 3.09, 3.11])]
SCIENTIFIC = re.compile(r"[eE][+-]?\d|\\times|\^|\$|×")


def _labels(ax, which):
    axis = ax.xaxis if which == "x" else ax.yaxis
    ax.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    major = [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_majorticklocs())
             if lo <= v <= hi]
    minor = [t.get_text() for t in axis.get_ticklabels(minor=True)]
    return major, minor


@pytest.mark.parametrize("results", [BLOW_UP, FLAT], ids=["log-y", "linear-y"])
def test_plot_axes_read_plainly(tmp_path, results):
    png = tmp_path / "ppl.png"
    fig = eval_ppl.save_plot(png, LENGTHS, results, trained_length=256,
                             title=eval_ppl.checkpoint_name(tmp_path / "tiny-run"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    (ax,) = fig.axes

    x_major, x_minor = _labels(ax, "x")
    assert x_major == [str(n) for n in LENGTHS]
    assert list(ax.xaxis.get_majorticklocs()) == LENGTHS
    assert not any(x_minor) and len(ax.xaxis.get_minorticklocs()) == 0

    y_major, y_minor = _labels(ax, "y")
    assert len(y_major) >= 2 and all(y_major)
    for text in y_major:
        assert not SCIENTIFIC.search(text), text
        float(text)  # a plain number
    assert not any(y_minor)
    formatter = ax.yaxis.get_major_formatter()
    assert not isinstance(formatter, ticker.LogFormatter)
    if isinstance(formatter, ticker.ScalarFormatter):
        assert not formatter.get_useOffset()
    # Large perplexities stay plain too (the formatter is asked last: it keeps these locs).
    assert formatter.format_ticks([100000.0, 200000.0]) == ["100000", "200000"]
    assert ax.get_yscale() == ("log" if results is BLOW_UP else "linear")

    marks = [line for line in ax.get_lines() if line.get_gid() == "trained-length"]
    assert len(marks) == 1
    (mark,) = marks
    assert list(mark.get_xdata()) == [256, 256] and mark.get_linestyle() == "--"
    assert "256" in mark.get_label()
    assert "tiny-run" in ax.get_title()


def test_plot_without_trained_length(tmp_path):
    fig = eval_ppl.save_plot(tmp_path / "ppl.png", LENGTHS, FLAT)
    (ax,) = fig.axes
    assert not [line for line in ax.get_lines() if line.get_gid() == "trained-length"]
    assert len(ax.get_lines()) == len(FLAT)


def test_checkpoint_name(tmp_path):
    run = tmp_path / "tiny"
    (run / "checkpoints" / "300").mkdir(parents=True)
    assert eval_ppl.checkpoint_name(run) == "tiny"
    assert eval_ppl.checkpoint_name(f"{run}/") == "tiny"
    assert eval_ppl.checkpoint_name(run / "checkpoints" / "300") == "tiny step 300"
