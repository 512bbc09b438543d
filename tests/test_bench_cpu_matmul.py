"""bench/cpu_matmul.py on tiny shapes: every product is measured on both sides after their
results are checked against each other, and a product that differs is refused."""

import numpy as np
import pytest

from runs import bench_module

cpu_matmul = bench_module("cpu_matmul")
TINY = dict(tokens=16, hidden=32, mlp=48, vocab=4800)  # two vocabulary slices


def test_every_product_is_measured_on_both_sides():
    rows = cpu_matmul.products(**TINY)
    assert [r[5] for r in rows if r[5]] == [2]
    out = cpu_matmul.measure(rows, reps=2)
    assert [r[0] for r in out] == [r[0] for r in rows]
    rates = np.array([r[4:] for r in out])
    assert np.all(np.isfinite(rates)) and np.all(rates > 0)


def test_a_product_that_differs_from_torch_is_refused(monkeypatch):
    right = cpu_matmul.jax_product
    monkeypatch.setattr(cpu_matmul, "jax_product",
                        lambda *a: (lambda f: lambda x, y: 2 * f(x, y))(right(*a)))
    with pytest.raises(SystemExit, match="error: lm_head forward.*differ"):
        cpu_matmul.measure(cpu_matmul.products(**TINY)[:1], reps=1)


def test_reps_below_one_is_an_error():
    with pytest.raises(SystemExit, match="error: --reps 0"):
        cpu_matmul.main(["--reps", "0"])
