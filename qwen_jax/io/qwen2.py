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

What the layout lacks: v1's dynamic NTK RoPE scaling and LogN attention scaling (and our
per-layer windows) are inference extras for inputs past the trained length (`seq_length`);
Qwen2 has none of them, so past that length a Qwen2 export is no longer the same model.
Qwen v1's `intermediate_size` counts both SwiGLU branches (twice the MLP width); Qwen2's is the
width of one branch, i.e. `config.mlp_width`.
"""

from __future__ import annotations

import numpy as np

from qwen_jax.io.convert import DTYPES, layer_params
from qwen_jax.model.config import QwenConfig


def qwen2_config(config: QwenConfig) -> dict:
    """A transformers `Qwen2Config` config.json of the same network.

    The rotary base is written both ways transformers has read it: top-level `rope_theta`
    (4.x) and `rope_parameters` (5.x, which also accepts the former). The dtype key is `dtype`
    (transformers >= 4.56; `torch_dtype` before, now deprecated)."""
    if config.rotary_pct != 1.0:
        raise ValueError(f"rotary_pct={config.rotary_pct}: Qwen2 rotates the full head "
                         "dimension only")
    theta = float(config.rotary_emb_base)
    return {
        "architectures": ["Qwen2ForCausalLM"],
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


def to_qwen2_state_dict(params, config: QwenConfig) -> dict[str, np.ndarray]:
    """Our parameters (stacked `layers` or unstacked `layers_<i>`) -> a Qwen2ForCausalLM state
    dict of float32 numpy arrays. Without an `lm_head` (a reward/value model) there is no
    `lm_head.weight`; other heads such a model carries are not part of this layout."""
    out = {"model.embed_tokens.weight": _f32(params["embed"]["embedding"])}
    for i in range(config.num_hidden_layers):
        layer = layer_params(params, i)
        for key, name in _layer_names(i).items():
            x = layer
            for part in key.split("/"):
                x = x[part]
            out[name] = _f32(_to_torch_layout(key, np.asarray(x)))
    out["model.norm.weight"] = _f32(params["ln_f"]["weight"])
    if "lm_head" in params:
        out["lm_head.weight"] = _f32(np.asarray(params["lm_head"]["kernel"]).T)
    return out


def qwen2_shapes(config: QwenConfig, lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Qwen2 layout and its shape."""
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
    return shapes


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any dtype numpy may lack, e.g. bfloat16)
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def from_qwen2_state_dict(state_dict, config: QwenConfig) -> dict:
    """A Qwen2ForCausalLM state dict (numpy arrays or torch tensors) -> our parameters in the
    stacked layout, as `config.param_dtype` numpy arrays. `lm_head.weight` is optional."""
    shapes = qwen2_shapes(config, lm_head="lm_head.weight" in state_dict)
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
    return params
