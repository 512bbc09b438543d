"""Model behaviour beyond the reference vectors: cache, chunks, padding, windows, modes."""

import functools
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model import layers
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import cache_bytes, init_cache
from qwen_jax.model.layers import einsum_f32_accumulate
from qwen_jax.model.long_context import ntk_alpha_from_level
from qwen_jax.model.transformer import (
    Qwen,
    default_positions,
    init_params,
    stack_layers,
    unstack_layers,
)
from qwen_jax.parallel import sharding
from qwen_jax.train.optim import OptimizerConfig
from qwen_jax.train.steps import Trainer

CFG = QwenConfig(hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
                 intermediate_size=256, seq_length=32, vocab_size=256, initializer_range=0.2,
                 max_position_embeddings=256, dtype="float32", param_dtype="float32",
                 matmul_precision="highest", attention_impl="xla")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def tokens(batch, length, seed=1):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 256))


@functools.partial(jax.jit, static_argnames=("config", "train"))
def apply(config, params, ids, segment_ids=None, cache=None, train=False, dropout_rng=None):
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return Qwen(config).apply({"params": params}, ids, segment_ids=segment_ids, cache=cache,
                              train=train, rngs=rngs)


def forward(config, params, ids, **kwargs):
    return np.asarray(apply(config, params, jnp.asarray(ids), **kwargs)[0])


def close(a, b, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_logits_are_not_trivial(params):
    logits = forward(CFG, params, tokens(1, 16))
    assert logits.std() > 0.5  # weights are large enough for mistakes to show


def test_scan_equals_unstacked_layers(params):
    """scan_layers=False runs one parameter subtree per layer; unstack/stack convert exactly."""
    ids = tokens(2, 24)
    flat, cfg = unstack_layers(params, CFG)
    assert not cfg.scan_layers and "layers" not in flat and "layers_1" in flat
    close(forward(CFG, params, ids), forward(cfg, flat, ids))
    back, cfg2 = stack_layers(flat, cfg)
    assert cfg2 == CFG
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # and the same cached decode, token by token
    cache_a, cache_b = init_cache(CFG, 2, 32, jnp.float32), init_cache(CFG, 2, 32, jnp.float32)
    for t in range(ids.shape[1]):
        a, cache_a = apply(CFG, params, jnp.asarray(ids[:, t:t + 1]), cache=cache_a)
        b, cache_b = apply(cfg, flat, jnp.asarray(ids[:, t:t + 1]), cache=cache_b)
        close(a, b)


@pytest.mark.parametrize("chunks", [(24,), (10, 14), (10, 1, 1, 12)])
def test_cached_chunks_equal_full_forward(params, chunks):
    """Within the trained length NTK/LogN are identity, so any chunking equals one forward."""
    ids = tokens(2, sum(chunks))
    full = forward(CFG, params, ids)
    cache = init_cache(CFG, 2, 32, jnp.float32)
    start = 0
    for size in chunks:
        logits, cache = apply(CFG, params, jnp.asarray(ids[:, start:start + size]), cache=cache)
        close(logits, full[:, start:start + size])
        start += size
    assert int(cache.index) == sum(chunks)
    np.testing.assert_array_equal(np.asarray(cache.next_position), [sum(chunks)] * 2)


def test_cache_keeps_ntk_alpha_of_first_call(params):
    """A long prefill (alpha 3) keeps alpha 3 for a following chunk, like the original."""
    ids = tokens(1, 56)
    cache = init_cache(CFG, 1, 64, jnp.float32)
    logits, cache = apply(CFG, params, jnp.asarray(ids[:, :40]), cache=cache)
    assert float(ntk_alpha_from_level(cache.ntk_level[0])) == 3.0
    close(logits, forward(CFG, params, ids[:, :40]))
    logits, cache = apply(CFG, params, jnp.asarray(ids[:, 40:]), cache=cache)
    assert float(ntk_alpha_from_level(cache.ntk_level[0])) == 3.0
    # A fresh forward over all 56 tokens also has alpha 3 (56 <= 64), so they agree.
    close(logits, forward(CFG, params, ids)[:, 40:])


def test_left_padded_batch_decodes_each_row_as_alone(params):
    lengths = [20, 13, 5]
    width = max(lengths)
    rows = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    config = CFG.replace(seq_length=8)  # make NTK and LogN active: per-row alphas differ
    cache = init_cache(config, 3, width + 4, jnp.float32)
    logits, cache = apply(config, params, jnp.asarray(ids), jnp.asarray(mask), cache)
    nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
    history = [list(r) + [int(nxt[i])] for i, r in enumerate(rows)]
    for _ in range(3):
        logits, cache = apply(config, params, jnp.asarray(nxt[:, None]),
                              jnp.ones((3, 1), jnp.int32), cache)
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1))
        for i in range(3):
            history[i].append(int(nxt[i]))
    for i, n in enumerate(lengths):
        # Alone: the same cache length as the batch, so the step function compiles once.
        out, c = apply(config, params, jnp.asarray(ids[i:i + 1]), jnp.asarray(mask[i:i + 1]),
                       init_cache(config, 1, width + 4, jnp.float32))
        close(out[0, -1], forward(config, params, rows[i][None])[0, -1], atol=5e-5)
        got = [int(jnp.argmax(out[0, -1]))]
        for _ in range(3):
            out, c = apply(config, params, jnp.asarray([[got[-1]]]), jnp.ones((1, 1), jnp.int32), c)
            got.append(int(jnp.argmax(out[0, -1])))
        assert history[i][n:] == got
        close(logits[i, -1], out[0, -1], atol=5e-5)


def test_default_positions():
    seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(default_positions(seg), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]])
    np.testing.assert_array_equal(default_positions(jnp.asarray([[1, 1], [0, 1]]),
                                                    jnp.asarray([5, 2])), [[5, 6], [2, 2]])


def test_window_at_least_length_is_full_attention(params):
    ids = tokens(1, 24)
    close(forward(CFG.replace(window_sizes=(24, 100)), params, ids), forward(CFG, params, ids))


def test_window_limits_receptive_field(params):
    """With windows W1, W2 a token sees back at most (W1-1)+(W2-1) positions."""
    config = CFG.replace(window_sizes=(3, 4))
    ids = tokens(1, 24)
    changed = ids.copy()
    changed[0, 0] = (changed[0, 0] + 1) % 256
    diff = np.abs(forward(config, params, ids) - forward(config, params, changed)).max(-1)[0]
    reach = (3 - 1) + (4 - 1)
    assert np.all(diff[reach + 1:] == 0.0)
    assert np.all(diff[:reach + 1] > 0.0)


def test_windowed_decoding_equals_windowed_forward(params):
    config = CFG.replace(window_sizes=(5, 0))
    ids = tokens(1, 20)
    full = forward(config, params, ids)
    cache = init_cache(config, 1, 20, jnp.float32)
    logits, cache = apply(config, params, jnp.asarray(ids[:, :12]), cache=cache)
    close(logits, full[:, :12])
    for i in range(12, 20):
        logits, cache = apply(config, params, jnp.asarray(ids[:, i:i + 1]), cache=cache)
        close(logits[:, 0], full[:, i])


def test_training_never_applies_long_context(params):
    """NTK, LogN and windows are inference-only, as in the original."""
    ids = tokens(1, 80)  # 2.5x the trained length
    long_ctx = CFG.replace(use_dynamic_ntk=True, use_logn_attn=True, window_sizes=(4, 4))
    plain = CFG.replace(use_dynamic_ntk=False, use_logn_attn=False)
    train_out = forward(long_ctx, params, ids, train=True)
    close(train_out, forward(plain, params, ids))
    assert np.abs(forward(long_ctx, params, ids) - np.asarray(train_out)).max() > 1e-2


def test_packed_segments_are_independent(params):
    a, b = tokens(1, 10, seed=3), tokens(1, 14, seed=4)
    packed = np.concatenate([a, b], axis=1)
    seg = np.asarray([[1] * 10 + [2] * 14])
    out = forward(CFG, params, packed, segment_ids=jnp.asarray(seg), train=True)
    close(out[:, :10], forward(CFG, params, a))
    close(out[:, 10:], forward(CFG, params, b))


def test_remat_policies_give_same_gradients(params):
    ids = jnp.asarray(tokens(2, 16))

    def grads(policy):
        model = Qwen(CFG.replace(remat_policy=policy))

        def loss(p):
            logits = model.apply({"params": p}, ids, train=True)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
                logits, ids[..., None], -1)[..., 0])
        return jax.jit(jax.grad(loss))(params)

    reference = grads("none")
    for policy in ("minimal", "save_dot_except_mlp", "full"):
        jax.tree_util.tree_map(lambda a, b: close(a, b, 1e-6), reference, grads(policy))


def test_bfloat16_compute_and_params(params):
    ids = tokens(2, 16)
    ref = forward(CFG, params, ids)
    mixed = forward(CFG.replace(dtype="bfloat16"), params, ids)
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    pure = forward(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"), bf16_params, ids)
    for out in (mixed, pure):
        assert out.dtype == np.float32
        # bfloat16 has an 8-bit mantissa: logits of std ~3 move by a few 1e-2.
        assert np.abs(out - ref).max() < 0.25 * ref.std()
        assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_dropout_only_in_training(params):
    config = CFG.replace(attn_dropout_prob=0.1, emb_dropout_prob=0.1)
    ids = jnp.asarray(tokens(1, 16))
    train = lambda seed: forward(config, params, ids, train=True,  # noqa: E731
                                 dropout_rng=jax.random.PRNGKey(seed))
    assert np.abs(train(0) - train(1)).max() > 1e-3
    close(train(0), train(0))
    plain = CFG.replace(use_dynamic_ntk=False, use_logn_attn=False)
    close(forward(config, params, ids), forward(plain, params, ids))


def test_cache_bytes():
    cache = init_cache(CFG, 3, 40, jnp.bfloat16)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert cache_bytes(CFG, 3, 40, jnp.bfloat16) == nbytes


def test_unstack_consume_and_export_from_either_layout(params):
    from qwen_jax.io.convert import hf_tensors

    owned = dict(params)
    flat, cfg = unstack_layers(owned, CFG, consume=True)
    assert "layers" not in owned  # the stacked arrays were handed over, not duplicated
    for (name_a, a), (name_b, b) in zip(hf_tensors(params, CFG), hf_tensors(flat, cfg),
                                        strict=True):
        assert name_a == name_b
        np.testing.assert_array_equal(a, b)


def test_cpu_decode_step_reads_weights_and_cache_in_place(params):
    """The compiled one-token step on CPU must not copy or transpose any weight matrix or the
    KV cache (each would add its size to the memory traffic of every decoded token)."""
    flat, cfg = unstack_layers(params, CFG)
    slots = 96  # a length no weight or activation dimension has
    step = jax.jit(lambda p, t, c: Qwen(cfg).apply({"params": p}, t, cache=c),
                   donate_argnums=(2,))
    hlo = step.lower(flat, jnp.zeros((2, 1), jnp.int32),
                     init_cache(cfg, 2, slots, jnp.float32)).compile().as_text()
    smallest = CFG.hidden_size * CFG.hidden_size  # a weight matrix; one layer's cache: more
    offenders = []  # one token's activations are far smaller (logits: 2 x 256)
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        name = line.split(" = ", 1)[0]
        if not any(op in line for op in (" copy(", " transpose(")) and not any(
                op in name for op in ("copy", "transpose", "dynamic-slice")):
            continue
        shape = line.split(" = ", 1)[1].split("{")[0]
        dims = [int(d) for d in shape[shape.find("[") + 1:shape.find("]")].split(",") if d]
        if int(np.prod(dims)) >= smallest:
            offenders.append(line.strip()[:160])
    assert not offenders, offenders


@pytest.mark.parametrize("equation,x_shape,k_shape", [
    ("bth,hnd->btnd", (2, 24, 64), (64, 4, 16)),
    ("btnd,ndh->bth", (2, 24, 4, 16), (4, 16, 64)),
    ("bth,hv->btv", (2, 24, 64), (64, 300)),
])
def test_f32_accumulate_projection_values_and_gradients(equation, x_shape, k_shape):
    """The CPU bfloat16 projection: the plain einsum's values; dx as the plain einsum's, dkernel
    without the bf16 rounding (float32 master weights get the exact product of the bf16
    operands)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=jnp.einsum(equation, x, kernel).shape), jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    hi = functools.partial(jnp.einsum, precision="highest")

    y, vjp = jax.vjp(lambda a, b: einsum_f32_accumulate(equation, a, b, jnp.bfloat16), x, kernel)
    dx, dkernel = vjp(g)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
    kernel16 = f32(kernel.astype(jnp.bfloat16))
    exact = hi(equation, f32(x), kernel16)
    ulp = np.abs(np.asarray(exact)) * 2.0 ** -7 + 1e-6  # one bf16 step at these magnitudes
    assert np.all(np.abs(np.asarray(f32(y)) - np.asarray(exact)) <= ulp)
    plain_y, plain_vjp = jax.vjp(lambda a, b: jnp.einsum(equation, a, b.astype(jnp.bfloat16)),
                                 x, kernel)
    close(f32(y), f32(plain_y), atol=float(ulp.max()))
    lhs, rhs = equation.split("->")[0].split(",")
    out = equation.split("->")[1]
    close(f32(dx), hi(f"{out},{rhs}->{lhs}", f32(g), kernel16),
          atol=float(np.abs(np.asarray(f32(dx))).max()) * 2.0 ** -7)
    exact_dk = hi(f"{lhs},{out}->{rhs}", f32(x), f32(g))
    close(dkernel, exact_dk, atol=1e-4)
    # the plain path rounds dkernel to bfloat16: visibly further from the exact product
    plain_dk = plain_vjp(g)[1]
    assert np.abs(np.asarray(plain_dk - exact_dk)).max() > 10 * np.abs(
        np.asarray(dkernel - exact_dk)).max()


def test_f32_accumulate_rejects_non_projections():
    x, k = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    for equation in ("bth,hv->bvt", "bth,vh->btv", "btn,nb->bt"):
        with pytest.raises(ValueError, match="not a dense projection"):
            einsum_f32_accumulate(equation, x, k, jnp.bfloat16)


def _projection_dot_operand_types(hlo: str) -> dict[str, set[str]]:
    """{projection name: element types of its dots' operands} in a compiled CPU module."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    found: dict[str, set[str]] = {}
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*op_name=\"[^\"]*/"
                      r"(q|k|v|o|up|gate|down|lm_head)/(?:[^/\"]*/)?dot_general", line)
        if m:
            found.setdefault(m.group(3), set()).update((types[m.group(1)], types[m.group(2)]))
    return found


def test_cpu_bfloat16_training_runs_bf16_dots(monkeypatch):
    """XLA CPU reaches its bf16 dot speed only for bf16 x bf16 -> f32 dots whose left operand
    contracts its last dimension; every other bf16 dot is silently upcast to float32. Every
    projection of the bf16 training step (forward, dx and dkernel) must stay bf16."""
    config = CFG.replace(dtype="bfloat16", matmul_precision="default")
    ids = tokens(2, 32)
    batch = {"inputs": ids, "targets": ids, "loss_mask": np.ones(ids.shape, np.float32)}

    def operand_types():
        trainer = Trainer(config, OptimizerConfig(warmup_steps=0, total_steps=10),
                          sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
        hlo = trainer.jit_train_step().lower(trainer.abstract_state(), batch,
                                             jax.random.PRNGKey(0)).compile().as_text()
        return _projection_dot_operand_types(hlo)

    found = operand_types()
    assert set(found) == {"q", "k", "v", "o", "up", "gate", "down", "lm_head"}, found
    assert all(t == {"bf16"} for t in found.values()), found
    # the plain einsum (bf16 result, transposed dkernel operand) is upcast: the check can fail
    monkeypatch.setattr(layers, "accumulate_in_f32", lambda dtype: False)
    assert any("f32" in t for t in operand_types().values())


def _rope_in_float32(x, cos, sin):
    """The rotation as the original writes it: x upcast, then rotate_half and the products."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1).astype(x.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rotary", [16, 8])
def test_rope_values_and_gradients_are_the_float32_rotation(dtype, rotary):
    """apply_rope equals the float32 rotation bit for bit, and so do the gradients of x, cos
    and sin in bfloat16 (float32 ones to 1e-5); the backward is the rotation by -sin, which
    relies on cos/sin repeating over the two halves. Whole and partial rotary dims."""
    kx, kg = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (2, 7, 3, 16), dtype) * 4
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, rotary, 2) / rotary))[None]
    cos, sin = layers.rope_cos_sin(jnp.arange(7)[None].repeat(2, 0) * 37, inv_freq)
    g = jax.random.normal(kg, x.shape, dtype)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(rope, x, cos, sin, g):
        out, vjp = jax.vjp(rope, x, cos, sin)
        return out, vjp(g)

    got, got_grads = value_and_grads(layers.apply_rope, x, cos, sin, g)
    want, want_grads = value_and_grads(_rope_in_float32, x, cos, sin, g)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype
        if a.dtype == jnp.bfloat16:
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        else:  # the same products and sums; XLA may contract them into FMAs differently
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_rope_never_slices_or_negates_a_float32_copy():
    """A bfloat16 rotation slices and negates in bfloat16 (exact there) and upcasts only for
    its products, forward and backward: no float32 copy of q/k or of their halves exists for
    XLA to store between fusions (on TPU those were a fifth of a layer's memory traffic)."""
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    cos, sin = layers.rope_cos_sin(jnp.arange(4)[None], jnp.ones((1, 4)))
    jaxpr = jax.make_jaxpr(lambda x: jax.vjp(lambda x: layers.apply_rope(x, cos, sin), x)[1](x))(x)

    def eqns(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from eqns(sub)

    moved = [(e.primitive.name, v.aval.dtype) for e in eqns(jaxpr.jaxpr)
             if e.primitive.name in ("slice", "neg", "concatenate") for v in e.outvars
             if v.aval.ndim == x.ndim]  # -sin, [B, T, R], is not a copy of q/k
    assert moved and all(dtype == jnp.bfloat16 for _, dtype in moved), moved
