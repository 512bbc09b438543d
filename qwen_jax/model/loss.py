"""Next-token cross-entropy fused with the lm_head, chunk by chunk: the [tokens, vocab]
logits are never materialised.

`fused_cross_entropy(hidden, kernel, targets)` gives each position's loss [B, T] (float32)
from the final hidden states [B, T, H] and the lm_head kernel [H, V]. The sequence is cut
into chunks; each chunk's logits are made, reduced to the loss and dropped. A custom VJP
keeps only each position's log-partition (logz) and recomputes a chunk's logits in the
backward pass to form `dlogits = softmax - onehot` and from it the hidden and kernel
gradients, so the peak memory of the loss is one chunk's logits, not the sequence's (the
anchors: Liger's fused linear cross-entropy, MaxText's vocabulary tiling, levanter's
blockwise cross-entropy, Apple's Cut Cross-Entropy). When everything is one chunk and the
program is for the CPU, the forward's logits are kept for the backward pass instead: the
same memory, one vocabulary-wide matmul fewer.

Per position, with logits l = h W, p = softmax(l), target y:
    loss = (1 - eps) (logz - l_y) + eps (logz - mean(l)) + z logz^2
    dloss/dl = p (1 + 2 z logz) - (1 - eps) onehot(y) - eps / V
(label smoothing eps and z-loss z are off by default). Logits are float32 from the compute-
dtype operands (float32 accumulation); on CPU the kernel gradient contracts a transposed
copy of h so that bfloat16 runs on XLA's bf16 dot kernels (see layers.einsum_f32_accumulate),
and the hidden state's gradient contracts the vocabulary slice by slice (see _backward_dots).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen_jax.model import layers
from qwen_jax.model.layers import dot32, transposed_copy


def fused_cross_entropy(hidden, kernel, targets, *, dtype=jnp.float32, chunk_tokens: int = 4096,
                        z_loss: float = 0.0, label_smoothing: float = 0.0, precision=None):
    """Per-position loss [B, T] float32 of `hidden` [B, T, H] through `kernel` [H, V] against
    `targets` [B, T]. Chunks hold about `chunk_tokens` positions (whole rows of the batch
    times a slice of the sequence)."""
    b, t, _ = hidden.shape
    length = max(1, min(t, chunk_tokens // max(b, 1)))
    pad = -t % length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # One chunk on CPU: the backward pass reuses the forward's logits instead of making them
    # again (one lm_head matmul fewer; the memory is the same one chunk's logits, held from
    # the forward to the backward pass). Elsewhere memory comes first: they are recomputed.
    keep = (t + pad) == length and layers.target_platform() == "cpu"
    static = (length, jnp.dtype(dtype), float(z_loss), float(label_smoothing), precision, keep)
    loss = _fused(static, hidden.astype(dtype), kernel, targets.astype(jnp.int32))
    return loss[:, :t]


def _chunks(x, length):
    """[B, T, ...] -> [T / length, B, length, ...] (the scan axis first)."""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, t // length, length, *x.shape[2:]), 0, 1)


def _unchunk(x):
    n, b, length = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * length, *x.shape[3:])


@jax.named_scope("lm_head")  # the projection's name in profiles and compiled HLO
def _logits(h, kernel, dtype, precision):
    """[B, C, H] x [H, V] -> [B, C, V] float32."""
    b, c, width = h.shape
    out = dot32(h.reshape(b * c, width), kernel.astype(dtype), 0, precision)
    return out.reshape(b, c, -1)


# On CPU the hidden state's gradient contracts the vocabulary in slices of about this many
# words (see _backward_dots).
CPU_VOCAB_SLICE = 2400


def vocab_slices(vocab: int) -> list[tuple[int, int]]:
    """The [lo, hi) slices of about CPU_VOCAB_SLICE words (at least one) over which
    `sliced_hidden_grad` contracts a vocabulary of `vocab` words."""
    n = max(1, round(vocab / CPU_VOCAB_SLICE))
    edges = [round(i * vocab / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def sliced_hidden_grad(d2, k, precision):
    """dlogits [T, V] x kernel [H, V] contracted over V, as a float32 sum of one product per
    vocabulary slice (`vocab_slices`): [T, H] float32."""
    return functools.reduce(jnp.add, (dot32(d2[:, lo:hi], k[:, lo:hi], 1, precision)
                                      for lo, hi in vocab_slices(k.shape[-1])))


def _one_device() -> bool:
    """Whether the running trace is for one device: the context mesh has one, or there is no
    context mesh and the process has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() == 1 if mesh.empty else mesh.size == 1


@jax.named_scope("lm_head")
def _backward_dots(h, d2, k, dtype_h, cpu_layout, precision):
    """dh = dlogits W^T and this chunk's kernel gradient h^T dlogits (float32).

    `cpu_layout` (half precision on CPU): dh, whose contraction runs over the whole
    vocabulary, is a sum of products over slices of about CPU_VOCAB_SLICE words, and the
    kernel gradient starts after it. XLA CPU's bf16 dot runs a [2048, 151,936] x [151,936,
    1024] product at a third to a half of the rate it reaches with a contraction of a few
    thousand, and the two products run side by side on the same cores otherwise (measured on
    2 cores, with transparent huge pages: the loss's forward and backward over 2048 tokens took
    5.7-7.6 s in 64 slices against 7.8-8.4 s as one product beside the other). The slices'
    partial sums are float32, so only the order of the float32 additions changes. Only for
    one device: slicing a vocabulary partitioned over devices costs collectives per slice."""
    b, c, width = h.shape
    h2 = h.reshape(b * c, width)
    if cpu_layout and _one_device():
        dh, d2 = jax.lax.optimization_barrier((sliced_hidden_grad(d2, k, precision), d2))
    else:
        dh = dot32(d2, k, 1, precision)
    dh = dh.astype(dtype_h).reshape(b, c, width)
    ht = transposed_copy(h2) if cpu_layout else h2.T
    return dh, dot32(ht, d2, 0, precision)


def _logsumexp(logits):
    """log(sum(exp(logits))) over the last axis. On CPU the sum of the exponentials is a
    product with a ones vector: XLA CPU then runs the exp as a vectorised loop and the sum
    as a matrix-vector kernel, about twice as fast here as its fused exp-and-reduce over a
    [tokens, vocab] block. The values are those of the reduction (float32 throughout)."""
    if layers.target_platform() != "cpu":
        return jax.nn.logsumexp(logits, axis=-1)
    top = jnp.max(logits, axis=-1, keepdims=True)
    ones = jnp.ones((logits.shape[-1],), jnp.float32)
    total = jnp.dot(jnp.exp(logits - top), ones, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(total) + top[..., 0]


def _chunk_loss(static, h, y, kernel):
    """One chunk's (loss, logz, logits)."""
    _, dtype, z_loss, eps, precision, _ = static
    logits = _logits(h, kernel, dtype, precision)
    logz = _logsumexp(logits)
    target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    loss = logz - target
    if eps:
        loss = (1 - eps) * loss + eps * (logz - jnp.mean(logits, axis=-1))
    if z_loss:
        loss = loss + z_loss * jnp.square(logz)
    return loss, logz, logits


def _forward(static, hidden, kernel, targets):
    """(loss, logz, the logits when there is one chunk)."""
    length = static[0]
    if hidden.shape[1] == length:  # one chunk: no loop
        return _chunk_loss(static, hidden, targets, kernel)

    def one(_, xs):
        loss, logz, _ = _chunk_loss(static, *xs, kernel)
        return None, (loss, logz)

    _, (loss, logz) = jax.lax.scan(one, None, (_chunks(hidden, length), _chunks(targets, length)))
    return _unchunk(loss), _unchunk(logz), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static, hidden, kernel, targets):
    return _forward(static, hidden, kernel, targets)[0]


def _fused_fwd(static, hidden, kernel, targets):
    loss, logz, logits = _forward(static, hidden, kernel, targets)
    keep = static[-1]
    return loss, (hidden, kernel, targets, logz, logits if keep else None)


def _chunk_grads(static, h, y, lz, gc, k, logits=None):
    """One chunk's (dh, float32 kernel gradient); `k`: the kernel in the compute dtype. The
    chunk's logits are made again unless given."""
    _, dtype, z_loss, eps, precision, _ = static
    vocab = k.shape[-1]
    b, c, _ = h.shape
    if logits is None:
        logits = _logits(h, k, dtype, precision)
    p = jnp.exp(logits - lz[..., None])
    scale = 1.0 + 2.0 * z_loss * lz if z_loss else 1.0
    dlogits = p * (scale * gc)[..., None] if z_loss else p * gc[..., None]
    onehot = jax.nn.one_hot(y, vocab, dtype=jnp.float32)
    dlogits = dlogits - ((1.0 - eps) * gc)[..., None] * onehot
    if eps:
        dlogits = dlogits - (eps / vocab) * gc[..., None]
    d2 = dlogits.astype(dtype).reshape(b * c, vocab)
    return _backward_dots(h, d2, k, h.dtype, layers.accumulate_in_f32(dtype), precision)


def _fused_bwd(static, residuals, g):
    length = static[0]
    hidden, kernel, targets, logz, logits = residuals
    g = g.astype(jnp.float32)
    k = kernel.astype(static[1])
    if hidden.shape[1] == length:  # one chunk: no loop, no zeroed accumulator
        dh, dkernel = _chunk_grads(static, hidden, targets, logz, g, k, logits)
        return dh, dkernel.astype(kernel.dtype), None

    def one(dkernel, xs):
        dh, dk = _chunk_grads(static, *xs, k)
        return dkernel + dk, dh

    dkernel, dh = jax.lax.scan(
        one, jnp.zeros(kernel.shape, jnp.float32),
        (_chunks(hidden, length), _chunks(targets, length), _chunks(logz, length),
         _chunks(g, length)))
    return _unchunk(dh), dkernel.astype(kernel.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
