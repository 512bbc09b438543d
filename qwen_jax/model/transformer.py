"""The Qwen v1 decoder (report §2.3) in Flax Linen, layers stacked and run with `nn.scan`.

    logits, cache = Qwen(config).apply({"params": params}, tokens, positions=..., segment_ids=...,
                                       cache=None | KVCache, train=False)

Inference (train=False) applies the report's long-context techniques exactly as the released
code does: dynamic NTK from the number of real tokens of the call that starts the cache, LogN on
query positions past the trained length, per-layer windows from the config. Training never does.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from qwen_jax.model import kv_cache, long_context, lora
from qwen_jax.model.attention import attention
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.layers import (
    MLP,
    Einsum,
    RMSNorm,
    apply_rope,
    dense_init,
    jnp_dtype,
    precision,
    rope_cos_sin,
)
from qwen_jax.parallel.sharding import RULES, tree_shardings

_ACT = ("activation_batch", "activation_length", "activation_embed")
_ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dot_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "qkv_proj", "attn_out", "out_proj"),
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Attention(nn.Module):
    config: QwenConfig
    train: bool = False

    @nn.compact
    def __call__(self, x, ctx: dict[str, Any], window, layer_idx, cache_kv):
        cfg = self.config
        h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim

        def proj(name):  # one third of the released fused c_attn, with its bias
            return Einsum("bth,hnd->btnd", (h, n, d), ("embed", "heads", "kv"), cfg,
                          bias_shape=(n, d), bias_axes=("heads", "kv"), target="c_attn",
                          name=name)(x)

        q, k, v = proj("q"), proj("k"), proj("v")
        if lora.adapts(cfg, "c_attn"):  # one adapter on the fused projection: A shared
            delta = lora.Adapter("bth,hcnd->btcnd", (h, 3, n, d), ("embed", None, "heads", "kv"),
                                 1, cfg, self.train, name=lora.C_ATTN)(x).astype(q.dtype)
            q, k, v = q + delta[:, :, 0], k + delta[:, :, 1], v + delta[:, :, 2]
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])
        if ctx["logn"] is not None:
            q = (q.astype(jnp.float32) * ctx["logn"][:, :, None, None]).astype(q.dtype)
        q = checkpoint_name(nn.with_logical_constraint(q, _ACT_HEADS), "qkv_proj")
        k = checkpoint_name(nn.with_logical_constraint(k, _ACT_HEADS), "qkv_proj")
        v = checkpoint_name(nn.with_logical_constraint(v, _ACT_HEADS), "qkv_proj")

        new_cache_kv = None
        if cache_kv is not None:
            # Written in place into the stacked cache (a slice written back per layer would
            # copy the whole layer cache every step), then this layer's slice is read. An int8
            # cache quantises the chunk (its real tokens' min/max) before attention reads it.
            valid = ctx["q_segment_ids"] != 0
            rows, length = ctx["cache_rows"], ctx["attend_len"]
            cache_k, cache_v = (kv_cache.write_layer(c, x, layer_idx, ctx["q_offset"], valid,
                                                     rows)
                                for c, x in zip(cache_kv, (k, v)))
            new_cache_kv = (cache_k, cache_v)
            k = kv_cache.read_layer(cache_k, layer_idx, q.dtype, length, rows)
            v = kv_cache.read_layer(cache_v, layer_idx, q.dtype, length, rows)

        dropout_rng = None
        if self.train and cfg.attn_dropout_prob > 0.0:
            dropout_rng = self.make_rng("dropout")
        out = attention(q, k, v, causal=True, window=window,
                        q_segment_ids=ctx["q_segment_ids"], kv_segment_ids=ctx["kv_segment_ids"],
                        q_offset=ctx["q_offset"], impl=cfg.attention_impl,
                        precision=precision(cfg),
                        dropout_rate=cfg.attn_dropout_prob if self.train else 0.0,
                        dropout_rng=dropout_rng)
        out = checkpoint_name(nn.with_logical_constraint(out, _ACT_HEADS), "attn_out")
        out = Einsum("btnd,ndh->bth", (n, d, h), ("heads", "kv", "embed"), cfg, name="o",
                     merge_contracting=out.shape[1] == 1, target="attn.c_proj",
                     train=self.train)(out)
        return checkpoint_name(out, "out_proj"), new_cache_kv


class DecoderLayer(nn.Module):
    """Pre-norm block: x += c_proj(attn(ln_1(x))); x += mlp(ln_2(x))."""

    config: QwenConfig
    train: bool = False

    @nn.compact
    def __call__(self, carry, layer_idx, ctx):
        cfg = self.config
        x, cache_kv = carry
        window = ctx["windows"][layer_idx] if ctx["windows"] is not None else None
        h = RMSNorm(cfg.layer_norm_epsilon, jnp_dtype(cfg.param_dtype), name="ln_1")(x)
        attn_out, cache_kv = Attention(cfg, self.train, name="attn")(h, ctx, window, layer_idx,
                                                                     cache_kv)
        x = x + attn_out
        h = RMSNorm(cfg.layer_norm_epsilon, jnp_dtype(cfg.param_dtype), name="ln_2")(x)
        x = x + MLP(cfg, self.train, name="mlp")(h)
        x = nn.with_logical_constraint(x, _ACT)
        return (x, cache_kv), None


def default_positions(segment_ids, offset=None):
    """Positions restarting at 0 where the segment id changes (packed documents, left padding);
    with a cache, continuing from each row's `offset` and counting only real tokens."""
    batch, length = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if offset is not None:
        real = (segment_ids != 0).astype(jnp.int32)
        return offset[:, None] + jnp.cumsum(real, axis=1) - real
    changed = jnp.concatenate([jnp.ones((batch, 1), bool),
                               segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = jax.lax.cummax(jnp.where(changed, idx, 0), axis=1)
    return idx - starts


class Embed(nn.Module):
    """Token embedding (untied from lm_head), looked up where the table lies: each 'fsdp'
    shard gathers its own columns of the table for all the tokens of its 'data' group (the
    token ids, 4 bytes each, are all-gathered over 'fsdp'), and the result is resharded to
    the batch-sharded activation (an all-to-all). The gradient comes back the same way and
    is a local scatter-add into the shard's columns: no device holds the whole table or its
    gradient (gathering the table over 'fsdp' instead costs a full float32 table of
    scatter-add temporaries and its all-reduce on every microbatch)."""

    config: QwenConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        table = self.param("embedding",
                           nn.with_logical_partitioning(dense_init(cfg), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), jnp_dtype(cfg.param_dtype))
        tokens = nn.with_logical_constraint(tokens, ("lookup_batch", "activation_length"))
        x = jnp.take(table, tokens, axis=0).astype(jnp_dtype(cfg.dtype))
        return nn.with_logical_constraint(x, ("lookup_batch", "activation_length", "embed"))


class Qwen(nn.Module):
    config: QwenConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 *, train: bool = False, head=None, attend_len: int | None = None,
                 cache_rows=None):
        """tokens [B, T]; positions [B, T] (default: from segment ids / the cache);
        segment_ids [B, T] (0 = padding; >0 = document id); returns (logits float32, cache).

        head(hidden [B, T, H], lm_head) -> output, if given, replaces the logits: `lm_head(h)`
        maps final hidden states to float32 logits, so a caller can ask for the last position
        only, or reduce chunks of logits to what it needs, without holding [B, T, V].

        attend_len (with a cache): attention reads only the cache's first `attend_len` slots;
        the caller guarantees that every key of this call lies there (a slot decoder whose
        rows are short reads a fraction of a long cache).
        cache_rows [B] (a per-row cache): the cache rows this batch's rows are (distinct); the
        others are neither read nor changed, so a step computes only the rows in use."""
        cfg = self.config
        batch, length = tokens.shape
        if train and cache is not None:
            raise ValueError("a KV cache is for inference; train=True takes none")
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        rows = cache_rows
        if rows is not None and (cache is None or not cache.per_row):
            raise ValueError("cache_rows needs a per-row cache")

        def of_rows(x):  # a per-row cache field, for this call's rows
            return x if rows is None else x[rows]

        if positions is None:
            positions = default_positions(
                segment_ids, None if cache is None else of_rows(cache.next_position))
        positions = positions.astype(jnp.int32)

        # Long context (inference only): NTK level per row from its real tokens.
        real = segment_ids != 0
        ntk_level = None
        if cfg.use_dynamic_ntk and not train:
            n_real = jnp.max(jnp.where(real, positions, -1), axis=1) + 1
            ntk_level = long_context.dynamic_ntk_level(n_real, cfg.seq_length)
            if cache is not None:  # fixed by the call that starts the cache
                ntk_level = jnp.where(of_rows(cache.ntk_level) < 0, ntk_level,
                                      of_rows(cache.ntk_level))
        inv_freq = long_context.rope_inv_freq(cfg.rotary_emb_base, cfg.rotary_dim, ntk_level)
        if inv_freq.ndim == 1:
            inv_freq = inv_freq[None]
        cos, sin = rope_cos_sin(positions, inv_freq)
        logn = None
        if cfg.use_logn_attn and not train:
            logn = long_context.logn_scale(positions, cfg.seq_length)

        ctx: dict[str, Any] = dict(cos=cos, sin=sin, logn=logn, q_segment_ids=segment_ids,
                                   kv_segment_ids=segment_ids, q_offset=0, windows=None,
                                   attend_len=None, cache_rows=None)
        if cfg.window_sizes is not None and not train:
            ctx["windows"] = jnp.asarray(cfg.window_sizes, jnp.int32)
        cache_kv = None
        if cache is not None:
            q_seg = real.astype(jnp.int32)
            all_seg = kv_cache.write_segments(cache.segment_ids, q_seg, of_rows(cache.index),
                                              rows)
            ctx.update(q_segment_ids=q_seg, kv_segment_ids=of_rows(all_seg)[:, :attend_len],
                       q_offset=of_rows(cache.index), attend_len=attend_len, cache_rows=rows)
            cache_kv = (cache.k, cache.v)

        x = Embed(cfg, name="embed")(tokens)
        x = nn.with_logical_constraint(x, _ACT)
        if train and cfg.emb_dropout_prob > 0.0:
            x = nn.Dropout(cfg.emb_dropout_prob)(x, deterministic=False)

        layer = DecoderLayer
        if cfg.remat_policy != "none" and train:
            layer = nn.remat(layer, prevent_cse=not cfg.scan_layers,
                             policy=REMAT_POLICIES[cfg.remat_policy])
        if cfg.scan_layers:
            stack = nn.scan(layer, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast), length=cfg.num_hidden_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            (x, cache_kv), _ = stack(cfg, train, name="layers")(
                (x, cache_kv), jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32), ctx)
        else:  # one module (and parameter set) per layer: see unstack_layers
            for i in range(cfg.num_hidden_layers):
                (x, cache_kv), _ = layer(cfg, train, name=f"layers_{i}")((x, cache_kv), i, ctx)

        x = RMSNorm(cfg.layer_norm_epsilon, jnp_dtype(cfg.param_dtype), name="ln_f")(x)
        lm_head = Einsum("bth,hv->btv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                         cfg, name="lm_head")

        def to_logits(hidden):
            return nn.with_logical_constraint(
                lm_head(hidden).astype(jnp.float32),
                ("activation_batch", "activation_length", "activation_vocab"))

        logits = to_logits(x) if head is None else head(x, to_logits)

        new_cache = None
        if cache is not None:
            # a per-row cache advances each row by its real tokens (a right-padded chunk)
            index = of_rows(cache.index) + (jnp.sum(real, axis=1, dtype=jnp.int32)
                                            if cache.per_row else length)
            next_position = jnp.maximum(of_rows(cache.next_position),
                                        jnp.max(jnp.where(real, positions + 1, 0), axis=1))
            level = (ntk_level if ntk_level is not None
                     else jnp.zeros_like(of_rows(cache.ntk_level))).astype(jnp.int32)
            if rows is not None:  # written back into the rows of this call
                index = cache.index.at[rows].set(index)
                next_position = cache.next_position.at[rows].set(next_position)
                level = cache.ntk_level.at[rows].set(level)
            new_cache = cache.replace(k=cache_kv[0], v=cache_kv[1], segment_ids=all_seg,
                                      index=index, next_position=next_position,
                                      ntk_level=level)
        return logits, new_cache


def init_params(config: QwenConfig, rng, batch: int = 1, length: int = 8):
    """Random parameters (boxed with their logical axis names stripped)."""
    variables = jax.jit(Qwen(config).init)(rng, jnp.zeros((batch, length), jnp.int32))
    return nn.unbox(variables["params"])


# A trace of the whole model's init (a few tenths of a second for the tiny model on CPU) gives
# each of the two: a training run asks for them again and again (its state's, optimizer's,
# checkpoint's and every frozen model's shardings), so each config's answer is kept. Both are
# trees of immutable leaves; callers get a fresh tree around them.
@functools.lru_cache(maxsize=64)
def _logical_axes(config: QwenConfig):
    abstract = jax.eval_shape(lambda: Qwen(config).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 8), jnp.int32)))
    return nn.get_partition_spec(abstract)["params"]


@functools.lru_cache(maxsize=64)
def _shapes(config: QwenConfig):
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def _fresh_tree(tree, leaf_type):
    return jax.tree_util.tree_map(lambda x: x, tree,
                                  is_leaf=lambda x: isinstance(x, leaf_type))


def param_logical_axes(config: QwenConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    return _fresh_tree(_logical_axes(config), PartitionSpec)


def abstract_params(config: QwenConfig, shardings=None):
    """Shape/dtype structs of the parameters of `config` (optionally with shardings)."""
    shapes = _fresh_tree(_shapes(config), jax.ShapeDtypeStruct)
    if shardings is None:
        return shapes
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def param_shardings(config: QwenConfig, mesh, rules=RULES):
    """NamedShardings of every parameter of `config` on `mesh`."""
    return tree_shardings(param_logical_axes(config), mesh, abstract_params(config), rules)


def unstack_layers(params, config: QwenConfig, *, consume: bool = False):
    """The stacked layout (`params["layers"]`, a leading layer axis: what `nn.scan` trains,
    checkpoints hold and convert_hf.py reads and writes) -> one subtree per layer
    (`params["layers_0"]`, ...), returned with `config.replace(scan_layers=False)` to run it.

    Decoding on CPU wants this: inside the scan XLA CPU copies every layer's weights out of
    the stack before its matmuls, which doubles the memory traffic of a memory-bound decode
    step (bench/generate.py: 20 -> 33 tokens/s at batch 1). With consume=True the stacked
    subtree is taken out of `params` itself and each stacked array is dropped as soon as it is
    split: the peak is the model plus one tensor instead of two models."""
    if not config.scan_layers:
        return params, config
    stacked = params.pop("layers") if consume else params["layers"]
    params = {k: v for k, v in params.items() if k != "layers"}
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    del stacked
    n = config.num_hidden_layers
    split = []
    for i in range(len(leaves)):
        leaf, leaves[i] = leaves[i], None
        split.append([leaf[j] for j in range(n)])
        del leaf
    for j in range(n):
        params[f"layers_{j}"] = jax.tree_util.tree_unflatten(treedef, [s[j] for s in split])
    return params, config.replace(scan_layers=False)


def stack_layers(params, config: QwenConfig):
    """The inverse of `unstack_layers`."""
    if config.scan_layers:
        return params, config
    params = dict(params)
    per_layer = [params.pop(f"layers_{j}") for j in range(config.num_hidden_layers)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
    return params, config.replace(scan_layers=True)
