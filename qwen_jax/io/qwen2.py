"""Qwen v1 weights in the Qwen2 layout that Hugging Face transformers runs natively.

`Qwen2ForCausalLM` loads without `trust_remote_code`, and within the trained length it is the
same network as Qwen v1: full-width RoPE, RMSNorm, SwiGLU, q/k/v biases only, untied lm_head.
The mapping (under `model.layers.{i}.`; torch Linear weights are [out, in], ours [in, out]):

    attn/{q,k,v} kernel [H, N, D], bias [N, D] -> self_attn.{q,k,v}_proj.{weight,bias}
    attn/o kernel [N, D, H]                    -> self_attn.o_proj.weight   (no bias)
    mlp/gate (v1 w2, the SiLU branch)          -> mlp.gate_proj.weight
    mlp/up   (v1 w1)                           -> mlp.up_proj.weight
    mlp/down (v1 c_proj)                       -> mlp.down_proj.weight
    ln_1, ln_2                                 -> input_layernorm, post_attention_layernorm
    embed/embedding -> model.embed_tokens.weight; ln_f -> model.norm.weight; lm_head -> lm_head

A reward model has no lm_head but a scalar head, score/kernel [H, 1] -> score.weight [1, H]:
it is `Qwen2ForSequenceClassification` with one label.

What the layout lacks: v1's dynamic NTK RoPE scaling and LogN attention scaling (and our
per-layer windows) are inference extras for inputs past the trained length (`seq_length`);
Qwen2 has none of them, so past that length a Qwen2 export is no longer the same model.
Qwen v1's `intermediate_size` counts both SwiGLU branches (twice the MLP width); Qwen2's is the
width of one branch, i.e. `config.mlp_width`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qwen_jax.io.convert import DTYPES, layer_params, write_config_json, write_safetensors
from qwen_jax.model.config import QwenConfig

ARCH_LM = "Qwen2ForCausalLM"
ARCH_SCORE = "Qwen2ForSequenceClassification"
SCORE = "score"  # a reward model's head in our parameters: {"kernel": [H, 1]}
SCORE_WEIGHT = "score.weight"


def qwen2_config(config: QwenConfig, *, pad_token_id: int | None = None) -> dict:
    """A transformers `Qwen2Config` config.json of the same network, in `config.param_dtype`.

    The rotary base is written both ways transformers has read it: top-level `rope_theta`
    (4.x) and `rope_parameters` (5.x, which also accepts the former). The dtype key is `dtype`
    (transformers >= 4.56; `torch_dtype` before, now deprecated).

    With `pad_token_id` it describes a reward model instead, `Qwen2ForSequenceClassification`
    with one label: transformers reads its score at each row's last token that is not
    `pad_token_id`, so that id must never be the last real token of a sequence."""
    if config.rotary_pct != 1.0:
        raise ValueError(f"rotary_pct={config.rotary_pct}: Qwen2 rotates the full head "
                         "dimension only")
    theta = float(config.rotary_emb_base)
    out = {
        "architectures": [ARCH_LM if pad_token_id is None else ARCH_SCORE],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_width,  # NOT config.intermediate_size (2x, v1 quirk)
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": config.param_dtype,
    }
    if pad_token_id is not None:
        out.update(num_labels=1, pad_token_id=int(pad_token_id))
    return out


def _layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {f"attn/{x}/kernel": p + f"self_attn.{x}_proj.weight" for x in "qkv"}
    names.update({f"attn/{x}/bias": p + f"self_attn.{x}_proj.bias" for x in "qkv"})
    names.update({
        "attn/o/kernel": p + "self_attn.o_proj.weight",
        "mlp/gate/kernel": p + "mlp.gate_proj.weight",
        "mlp/up/kernel": p + "mlp.up_proj.weight",
        "mlp/down/kernel": p + "mlp.down_proj.weight",
        "ln_1/weight": p + "input_layernorm.weight",
        "ln_2/weight": p + "post_attention_layernorm.weight",
    })
    return names


def _to_torch_layout(key: str, x: np.ndarray) -> np.ndarray:
    """One layer tensor of ours -> its Qwen2 [out, in] form."""
    if key.endswith("bias"):
        return x.reshape(-1)  # [N, D] -> [N*D]
    if key.startswith("attn/o"):
        return x.reshape(-1, x.shape[-1]).T  # [N, D, H] -> [H, N*D]
    if key.startswith("attn/"):
        return x.reshape(x.shape[0], -1).T  # [H, N, D] -> [N*D, H]
    return x.T if x.ndim == 2 else x  # mlp [in, out] -> [out, in]; norms as they are


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def qwen2_tensors(params, config: QwenConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters (stacked `layers` or unstacked `layers_<i>`) -> (name, array) of the
    Qwen2 layout, one tensor at a time, in the order of `qwen2_shapes(config, lm_head=...,
    score=...)` for the heads `params` has. The arrays keep the parameters' dtype and are
    transposed views where the layout allows, so a writer copies one tensor at a time."""
    yield "model.embed_tokens.weight", np.asarray(params["embed"]["embedding"])
    for i in range(config.num_hidden_layers):
        layer = layer_params(params, i)
        for key, name in _layer_names(i).items():
            x = layer
            for part in key.split("/"):
                x = x[part]
            yield name, _to_torch_layout(key, np.asarray(x))
    yield "model.norm.weight", np.asarray(params["ln_f"]["weight"])
    if "lm_head" in params:
        yield "lm_head.weight", np.asarray(params["lm_head"]["kernel"]).T
    if SCORE in params:
        yield SCORE_WEIGHT, np.asarray(params[SCORE]["kernel"]).T


def to_qwen2_state_dict(params, config: QwenConfig) -> dict[str, np.ndarray]:
    """Our parameters -> a Qwen2 state dict of float32 numpy arrays (`qwen2_tensors`, each
    made a float32 copy). Without an `lm_head` (a reward/value model) there is no
    `lm_head.weight`; a `score` head becomes `score.weight`."""
    return {name: _f32(x) for name, x in qwen2_tensors(params, config)}


def v1_to_qwen2_state_dict(tensors, config: QwenConfig) -> dict:
    """Original Qwen v1 tensors (`convert.hf_shapes` names; torch tensors or numpy arrays) ->
    the same tensors under the Qwen2 names. Both layouts store torch [out, in] matrices, so
    nothing is transposed; `attn.c_attn` is split by rows into q | k | v."""
    h = config.hidden_size
    out = {"model.embed_tokens.weight": tensors["transformer.wte.weight"]}
    v1 = {"attn/o/kernel": "attn.c_proj.weight", "mlp/gate/kernel": "mlp.w2.weight",
          "mlp/up/kernel": "mlp.w1.weight", "mlp/down/kernel": "mlp.c_proj.weight",
          "ln_1/weight": "ln_1.weight", "ln_2/weight": "ln_2.weight"}
    for i in range(config.num_hidden_layers):
        src, names = f"transformer.h.{i}.", _layer_names(i)
        fused = {"kernel": tensors[src + "attn.c_attn.weight"],
                 "bias": tensors[src + "attn.c_attn.bias"]}
        for key, name in names.items():
            part = key.split("/")
            if key in v1:
                out[name] = tensors[src + v1[key]]
            else:  # attn/{q,k,v}/{kernel,bias}
                j = "qkv".index(part[1])
                out[name] = fused[part[2]][j * h:(j + 1) * h]
    out["model.norm.weight"] = tensors["transformer.ln_f.weight"]
    out["lm_head.weight"] = tensors["lm_head.weight"]
    return out


def qwen2_shapes(config: QwenConfig, lm_head: bool = True,
                 score: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Qwen2 layout and its shape, in `qwen2_tensors`' order."""
    h, n, d, f, v = (config.hidden_size, config.num_attention_heads, config.head_dim,
                     config.mlp_width, config.vocab_size)
    shapes = {"model.embed_tokens.weight": (v, h)}
    per_key = {"kernel": (n * d, h), "bias": (n * d,)}
    for i in range(config.num_hidden_layers):
        for key, name in _layer_names(i).items():
            if key.startswith("attn/o"):
                shapes[name] = (h, n * d)
            elif key.startswith("attn/"):
                shapes[name] = per_key[key.rsplit("/", 1)[1]]
            elif key.startswith("mlp/down"):
                shapes[name] = (h, f)
            elif key.startswith("mlp/"):
                shapes[name] = (f, h)
            else:
                shapes[name] = (h,)
    shapes["model.norm.weight"] = (h,)
    if lm_head:
        shapes["lm_head.weight"] = (v, h)
    if score:
        shapes[SCORE_WEIGHT] = (1, h)
    return shapes


def write_qwen2(out_dir, params, config: QwenConfig, max_shard_bytes: int = 5 * 2**30,
                dtype: str | None = None, pad_token_id: int | None = None) -> list[str]:
    """Write the Qwen2 layout into the existing `out_dir`: safetensors (sharded with an index
    above `max_shard_bytes`, as `convert.write_hf`) and config.json. The tensors are written in
    `dtype` (default `config.param_dtype`), one at a time from `qwen2_tensors`. Parameters with
    a `score` head and no lm_head (a reward model) need `pad_token_id` (see `qwen2_config`).
    Returns the weight file names."""
    config = config.replace(param_dtype=dtype or config.param_dtype)
    score = SCORE in params
    if score != (pad_token_id is not None) or score == ("lm_head" in params):
        raise ValueError("the Qwen2 layout holds a language model (lm_head) or a reward model "
                         "(score head, with pad_token_id)")
    config_json = qwen2_config(config, pad_token_id=pad_token_id)
    shapes = qwen2_shapes(config, lm_head=not score, score=score)
    names = write_safetensors(out_dir, shapes, qwen2_tensors(params, config),
                              DTYPES[config.param_dtype], max_shard_bytes)
    write_config_json(out_dir, config_json)
    return names


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any dtype numpy may lack, e.g. bfloat16)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def from_qwen2_state_dict(state_dict, config: QwenConfig) -> dict:
    """A Qwen2ForCausalLM state dict (numpy arrays or torch tensors) -> our parameters in the
    stacked layout, as `config.param_dtype` numpy arrays. `lm_head.weight` and `score.weight`
    are optional."""
    shapes = qwen2_shapes(config, lm_head="lm_head.weight" in state_dict,
                          score=SCORE_WEIGHT in state_dict)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        raise ValueError(f"not a Qwen2 state dict of this config ({config.num_hidden_layers} "
                         f"layers): missing {missing[:5]}, unexpected {unexpected[:5]}")
    arrays = {}
    for name, shape in shapes.items():
        arrays[name] = _numpy(state_dict[name])
        if arrays[name].shape != shape:
            raise ValueError(f"{name}: shape {list(arrays[name].shape)}, expected {list(shape)}")
    dtype = DTYPES[config.param_dtype]
    h, n, d = config.hidden_size, config.num_attention_heads, config.head_dim

    def ours(key, x):  # the inverse of _to_torch_layout
        if key.endswith("bias"):
            return x.reshape(n, d)
        if key.startswith("attn/o"):
            return x.T.reshape(n, d, h)
        if key.startswith("attn/"):
            return x.T.reshape(h, n, d)
        return x.T if x.ndim == 2 else x

    layers: dict = {}
    for key in _layer_names(0):
        stacked = np.stack([ours(key, arrays[_layer_names(i)[key]])
                            for i in range(config.num_hidden_layers)]).astype(dtype)
        *path, leaf = key.split("/")
        node = layers
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = stacked
    params = {"embed": {"embedding": arrays["model.embed_tokens.weight"].astype(dtype)},
              "layers": layers,
              "ln_f": {"weight": arrays["model.norm.weight"].astype(dtype)}}
    if "lm_head.weight" in arrays:
        params["lm_head"] = {"kernel": np.ascontiguousarray(arrays["lm_head.weight"].T,
                                                            dtype=dtype)}
    if SCORE_WEIGHT in arrays:
        params[SCORE] = {"kernel": np.ascontiguousarray(arrays[SCORE_WEIGHT].T, dtype=dtype)}
    return params
