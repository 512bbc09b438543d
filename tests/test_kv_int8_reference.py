"""The int8 KV cache against the ORIGINAL Qwen v1 code with `use_cache_quantization`.

The vectors (`$QWEN_KVQ_VECTORS`, default ../shared/reference/kvq; a held-out set of another
config replaces them, so nothing here depends on this one) hold a tiny model in the original
layout, one prompt, its prefill logits and the logits of greedy single-token steps that cross
seq_length (LogN on, the prefill's NTK alpha kept), with the quantised cache (int8_*) and
without (float_*). Steps are fed the reference's own greedy tokens, so every step compares
logits of the same inputs; the greedy ids are then our argmax of each.

Why int8 is not held to 1e-4 like the float cache: the original truncates x / scale + zero,
and the largest element of every chunk (one per row, head, layer, for k and v) lands on
255 - tiny or 255 + tiny depending on the last bits of the chunk's min and max, i.e. 254 or
255. Keys computed by another library (or another torch kernel) differ from the original's in
the last bits, so about half of those elements come out one step apart (measured while writing
this: a line-by-line torch port of the original's attention path, torch 2.13 CPU, reproduces
these prefill logits bit for bit, yet differs from the decoding steps by 1.6e-3). All else
(truncation, clamp, unrounded zero, the scale formula, the exact division) is checked bit for
bit against numpy in the unit test below.
So int8 is held to a quarter of the original's own int8-vs-float prefill difference (0.046
here: ours 2.4e-4 prefill, 1.6e-2 steps) - a wrong detail costs more (rounding instead of
truncating: 0.21; per token instead of per chunk: 0.16; zero rounded: 0.059) - plus identical
greedy ids wherever the reference's own top-2 margin exceeds twice that.
"""

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.infer.generate import GenerationConfig, generate
from qwen_jax.io.convert import load_hf_config, load_hf_params
from qwen_jax.model import kv_cache
from qwen_jax.model.config import preset
from qwen_jax.model.kv_cache import cache_bytes, init_cache
from qwen_jax.model.transformer import Qwen

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4  # the float cache, and the floor of the int8 tolerance
INT8_FRACTION = 0.25  # int8 tolerance: this fraction of the original's int8-vs-float prefill


def _vectors_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("QWEN_KVQ_VECTORS", ROOT.parent / "shared/reference/kvq"))
    if not (path / "cases.json").is_file():
        raise FileNotFoundError(f"int8 KV-cache vectors not found at {path}; put ../shared beside "
                                "the project root or set QWEN_KVQ_VECTORS")
    return path


@pytest.fixture(scope="module")
def kvq():
    folder = _vectors_dir()
    manifest = json.loads((folder / "cases.json").read_text())
    for name, digest in manifest.get("sha256", {}).items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    config = load_hf_config(folder, "float32").replace(matmul_precision="highest",
                                                       attention_impl="xla")
    hf = json.loads((folder / "config.json").read_text())
    assert config.use_dynamic_ntk == hf["use_dynamic_ntk"]
    assert config.use_logn_attn == hf["use_logn_attn"]
    params = load_hf_params(folder, config)
    arrays = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    return manifest, config, params, arrays


def _decode(config, params, ids, feed, kind):
    """Prefill `ids` [1, P], then one step per token of `feed` (the reference's greedy ids but
    the last): (prefill logits [P, V], step logits [len(feed) - 1, V])."""
    cache = init_cache(config, ids.shape[0], ids.shape[1] + len(feed), kind)
    step = jax.jit(lambda p, t, c: Qwen(config).apply({"params": p}, t, cache=c))
    prefill, cache = step(params, jnp.asarray(ids), cache)
    steps = []
    for token in feed[:-1]:
        logits, cache = step(params, jnp.asarray([[int(token)]], jnp.int32), cache)
        steps.append(np.asarray(logits[0, -1]))
    return np.asarray(prefill[0]), np.stack(steps)


def _tolerance(manifest, kind):
    if kind == "float":
        return ATOL
    return max(ATOL, INT8_FRACTION * manifest["int8_vs_float"]["prefill_max_abs_diff"])


@pytest.fixture(scope="module")
def runs(kvq):
    manifest, config, params, arrays = kvq
    out = {}
    for kind, cache in (("int8", "int8"), ("float", jnp.float32)):
        prefill, steps = _decode(config, params, arrays["input_ids"],
                                 arrays[f"{kind}_generated_ids"], cache)
        ids = np.concatenate([prefill[-1:].argmax(-1), steps.argmax(-1)])
        diff = {what: float(np.abs(got - arrays[f"{kind}_{name}_logits"]).max())
                for what, name, got in (("prefill_diff", "prefill", prefill),
                                        ("steps_diff", "step", steps))}
        out[kind] = dict(prefill=prefill, steps=steps, ids=ids, **diff)
    return out


@pytest.mark.parametrize("kind", ["int8", "float"])
def test_cached_decoding_equals_the_original(kvq, runs, kind):
    manifest, _, _, arrays = kvq
    run, tol = runs[kind], _tolerance(manifest, kind)
    want_ids = arrays[f"{kind}_generated_ids"]
    assert run["steps"].shape == arrays[f"{kind}_step_logits"].shape
    print(f"\n{kind}: max |ours - original| prefill {run['prefill_diff']:.3g}, steps "
          f"{run['steps_diff']:.3g} (tolerance {tol:.3g}); greedy ids "
          f"{int(np.sum(run['ids'] == want_ids))}/{len(want_ids)} identical")
    assert run["prefill_diff"] <= tol
    assert run["steps_diff"] <= tol
    # The reference's top-2 margin at each choice: only a near tie may pick another id.
    ref_logits = np.concatenate([arrays[f"{kind}_prefill_logits"][-1:],
                                 arrays[f"{kind}_step_logits"]])
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    np.testing.assert_array_equal(run["ids"][clear], want_ids[clear])
    if kind == "float":
        np.testing.assert_array_equal(run["ids"], want_ids)


def test_quality_cost_equals_the_originals(kvq, runs):
    """max |int8 - float| logits and the greedy agreement, ours as the original's: each differs
    from the original's by at most our two deviations from the reference."""
    manifest, _, _, arrays = kvq
    want = manifest["int8_vs_float"]
    i8, fl = runs["int8"], runs["float"]
    ours = {"prefill_max_abs_diff": float(np.abs(i8["prefill"] - fl["prefill"]).max()),
            "steps_max_abs_diff": float(np.abs(i8["steps"] - fl["steps"]).max()),
            "greedy_agreement": float(np.mean(i8["ids"] == fl["ids"]))}
    print(f"\nint8 vs float, ours: {ours}\nint8 vs float, original: {want}")
    both_exact = all(np.array_equal(runs[k]["ids"], arrays[f"{k}_generated_ids"])
                     for k in ("int8", "float"))
    assert both_exact, "the agreement is comparable only on the reference's own greedy ids"
    assert ours["greedy_agreement"] == pytest.approx(want["greedy_agreement"], abs=1e-9)
    bound = {key: i8[f"{key}_diff"] + fl[f"{key}_diff"] + 1e-6 for key in ("prefill", "steps")}
    assert abs(ours["prefill_max_abs_diff"] - want["prefill_max_abs_diff"]) <= bound["prefill"]
    assert abs(ours["steps_max_abs_diff"] - want["steps_max_abs_diff"]) <= bound["steps"]


# ------------------------------------------------------------------------ the function itself
def _numpy_quantize(x, valid):
    """quantize_cache_v written from the formula, in x's float32: per (row, head) over the
    real positions and head_dim; scale = (max - min) / 255, zero = 0 - min / scale (not
    rounded), q = uint8(clamp(x / scale + zero, 0, 255)) truncating."""
    keep = valid[:, :, None, None]
    fmax = np.where(keep, x, -np.inf).max(axis=(1, 3), keepdims=True).astype(np.float32)
    fmin = np.where(keep, x, np.inf).min(axis=(1, 3), keepdims=True).astype(np.float32)
    scale = (fmax - fmin) / np.float32(255)
    zero = np.float32(0) - fmin / scale
    q = np.trunc(np.clip(x / scale + zero, np.float32(0), np.float32(255))).astype(np.uint8)
    return q, scale[:, 0, :, 0], zero[:, 0, :, 0]


def test_quantize_equals_the_formula_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 7, 4, 16)) * rng.uniform(0.1, 3, size=(3, 1, 4, 1))
         + rng.normal(size=(3, 1, 4, 1))).astype(np.float32)
    valid = np.ones((3, 7), bool)
    valid[1, :3] = False  # a left-padded row: its padding is out of the min/max ...
    x[1, :3] *= 50.0  # ... and far outside its range, so it is clamped to 0 / 255
    for fn in (kv_cache.quantize, jax.jit(kv_cache.quantize)):
        q, scale, zero = fn(jnp.asarray(x), jnp.asarray(valid))
        want_q, want_scale, want_zero = _numpy_quantize(x, valid)
        np.testing.assert_array_equal(np.asarray(scale), want_scale)
        np.testing.assert_array_equal(np.asarray(zero), want_zero)
        np.testing.assert_array_equal(np.asarray(q), want_q)
    assert {0, 255} <= set(np.unique(want_q[1, :3]).tolist())  # clamped both ways
    assert not np.allclose(want_zero, np.round(want_zero))  # the zero point is not rounded
    # truncation, not rounding: some x / scale + zero have a fraction above one half
    frac = (x / want_scale[:, None, :, None] + want_zero[:, None, :, None]) % 1
    assert np.any(valid[:, :, None, None] & (frac > 0.5))
    # read back as scale x (q - zero) (scale/zero given per position); within a step of x
    per_slot = [np.broadcast_to(a[:, None, :], (3, 7, 4)) for a in (want_scale, want_zero)]
    got = kv_cache.dequantize(jnp.asarray(want_q), *map(jnp.asarray, per_slot), jnp.float32)
    want = per_slot[0][..., None] * (want_q.astype(np.float32) - per_slot[1][..., None])
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.all((np.abs(want - x) <= per_slot[0][..., None] * 1.0001)[valid])
    # no NaN where the original divides by zero: a constant chunk, an all-padding row
    q, scale, zero = kv_cache.quantize(jnp.full((2, 3, 2, 4), 0.5),
                                       jnp.asarray([[True] * 3, [False] * 3]))
    back = kv_cache.dequantize(q, *(jnp.broadcast_to(a[:, None], (2, 3, 2)) for a in (scale, zero)),
                               jnp.float32)
    np.testing.assert_array_equal(np.asarray(back)[0], 0.5)  # exact
    assert np.isfinite(np.asarray(back)).all()


def test_each_slot_keeps_its_chunks_scale_and_zero(kvq):
    _, config, params, arrays = kvq
    ids = arrays["input_ids"][:, :6]
    cache = init_cache(config, 1, 10, "int8")
    step = jax.jit(lambda p, t, c: Qwen(config).apply({"params": p}, t, cache=c))
    _, cache = step(params, jnp.asarray(ids), cache)
    _, cache = step(params, jnp.asarray(ids[:, :1]), cache)
    for entry in (cache.k, cache.v):
        assert entry.q.dtype == jnp.uint8 and entry.scale.dtype == jnp.float32
        scale = np.asarray(entry.scale)  # [L, B, N, S]
        assert (scale[..., :6] == scale[..., :1]).all()  # the prompt: one chunk
        assert (scale[..., 6] != scale[..., 0]).all()  # the step: its own
        assert (scale[..., 7:] == 0).all()  # empty slots


def test_left_padded_rows_get_what_they_get_alone(kvq):
    _, config, params, arrays = kvq
    prompt = arrays["input_ids"][0].tolist()
    prompts = [prompt, prompt[:5], prompt[3:] + prompt[:2]]
    gen = GenerationConfig(max_new_tokens=8, do_sample=False)
    # pad_to_multiple=1: alone, a row has no padding at all; in the batch it has up to 9.
    batch = generate(params, config, prompts, gen, kv_cache="int8", return_logits=True,
                     pad_to_multiple=1)
    for row, p in enumerate(prompts):
        alone = generate(params, config, [p], gen, kv_cache="int8", return_logits=True,
                         pad_to_multiple=1)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        print(f"row {row}: max |batch - alone| logits "
              f"{np.abs(batch.logits[row] - alone.logits[0]).max():.3g}")
    # The row's scale/zero equal those of the unpadded prompt alone (to float rounding: the
    # two runs' matmuls have other shapes); with the padding in its min/max they would not.
    longest = len(prompts[0])
    tokens = np.zeros((1, longest), np.int32)
    tokens[0, -5:] = prompts[1]
    segments = (np.arange(longest)[None] >= longest - 5).astype(np.int32)
    fn = jax.jit(lambda p, t, s, c: Qwen(config).apply({"params": p}, t, segment_ids=s,
                                                       cache=c)[1])
    padded = fn(params, tokens, segments, init_cache(config, 1, longest, "int8"))
    alone = fn(params, tokens[:, -5:], segments[:, -5:], init_cache(config, 1, 5, "int8"))
    for name in ("k", "v"):
        a, b = getattr(padded, name), getattr(alone, name)
        np.testing.assert_allclose(np.asarray(a.scale)[..., -5:], np.asarray(b.scale), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(a.zero)[..., -5:], np.asarray(b.zero), rtol=1e-5,
                                   atol=1e-5)


def test_cache_bytes_halve_bf16():
    config = preset("7b")
    cache = jax.eval_shape(lambda: init_cache(config, 2, 16, "int8"))
    assert cache_bytes(config, 2, 16, "int8") == sum(
        x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    bf16, int8 = cache_bytes(config, 64, 2048, "bf16"), cache_bytes(config, 64, 2048, "int8")
    print(f"\n7B KV cache at 64 x 2048: bf16 {bf16 / 2**30:.2f} GiB, int8 "
          f"{int8 / 2**30:.2f} GiB, float32 {cache_bytes(config, 64, 2048, 'fp32') / 2**30:.2f}")
    head_dim = config.head_dim
    assert int8 / bf16 == pytest.approx((head_dim + 8) / (2 * head_dim), rel=1e-3)
