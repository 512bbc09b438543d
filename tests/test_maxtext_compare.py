"""bench/maxtext_compare.py without MaxText: its extrapolation from the loop-free compiles,
the model-FLOP count it prints beside them, and its refusal of a missing interpreter."""

import pathlib
import subprocess
import sys

import pytest
from runs import bench_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    return bench_module("maxtext_compare")


def test_extrapolation_is_exact_for_a_bilinear_cost(compare):
    """f(L, B) = a + b L + c B + d L B sampled at L = 1, 2 and B = 8, 16 gives back the step
    at 40 layers: one microbatch of 8, and 8 microbatches of 8 with the optimizer (a + b L)
    once."""
    a, b, c, d = 5.0, 3.0, 0.25, 0.125
    f = lambda n, m: a + b * n + c * m + d * n * m  # noqa: E731
    points = {(n, m): {key: f(n, m) * scale for key, scale in
                       (("flops", 1e12), ("bytes_accessed", 1e9), ("optimal_seconds", 1.0))}
              for n in (1, 2) for m in (8, 16)}
    out = compare.extrapolate(points)
    assert out["one_microbatch"]["flops"] == pytest.approx(f(40, 8) * 1e12)
    whole = a + b * 40 + 8 * (8 * c + 8 * d * 40)
    assert out["whole_step"]["optimal_seconds"] == pytest.approx(whole)
    assert out["whole_step"]["bytes_accessed"] == pytest.approx(whole * 1e9)


def test_model_flops_count_the_lm_head_and_half_the_causal_attention(compare):
    """6 x (matmul parameters x tokens) + 6 x causal attention (half of 2 T N D per token and
    layer), for the 4M-token step: the same figure for both codebases."""
    tokens = 2048 * 2048
    layer = 4 * 5120 * 5120 + 3 * 5120 * 13696
    want = 6 * tokens * (40 * layer + 5120 * 152064) + 6 * tokens * 40 * 2048 * 5120
    assert compare.model_flops_per_device(32) == pytest.approx(want / 32)


def test_a_missing_maxtext_python_is_refused(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "maxtext_compare.py"),
                           "--maxtext-python", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"--maxtext-python {missing}: no such file" in proc.stderr


def test_reuse_compiles_only_what_the_earlier_run_lacks(compare, monkeypatch):
    """--reuse: entries of an earlier run for the same topology are taken as they are."""
    made = []
    monkeypatch.setattr(compare.aot, "topology", lambda name: type("S", (), {
        "devices": [0] * 32})())
    monkeypatch.setattr(compare, "maxtext", lambda *a: made.append(("maxtext", a[-1])) or {})
    monkeypatch.setattr(compare, "ours", lambda cfg, topology, **kw: made.append(
        ("ours", kw.get("layers"), cfg.global_batch_size, kw.get("declare_attention_cost")))
        or {})
    grid = ["1x8", "1x16", "2x8", "2x16"]
    cache = {"topology": "v5:2x4x4",
             "maxtext": {"real": {"memory": 1}, "points": {k: {"cost": 1} for k in grid}},
             "qwen_jax": {"real": {"memory": 2}, "points": {k: {"cost": 2} for k in grid[:3]}}}
    results = compare.compile_all("python", "v5:2x4x4", cache)
    assert made[0] == ("ours", 2, 16 * 32, True)  # the one point qwen_jax lacked
    assert [m[-1] for m in made[1:]] == [False] * 4 and len(made) == 5
    assert results["maxtext"]["real"] == {"memory": 1}
    assert results["qwen_jax"]["points"]["1x16"] == {"cost": 2}
    made.clear()
    compare.compile_all("python", "v5:2x2x2", cache)  # another topology: nothing reused
    assert len(made) == 5 + 1 + 4 + 4
