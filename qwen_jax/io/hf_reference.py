"""PyTorch references for checking a converted checkpoint (`convert_hf.py check`).

The default reference is transformers' `Qwen2ForCausalLM`, an implementation independent of
both ours and the Qwen v1 release, with the v1 weights mapped onto it
(`qwen2.v1_to_qwen2_state_dict`):

    transformer.wte -> model.embed_tokens        attn.c_attn (rows q|k|v) -> self_attn.{q,k,v}_proj
    ln_1 -> input_layernorm, ln_2 -> post_attention_layernorm     attn.c_proj -> self_attn.o_proj
    mlp.w2 (SiLU gate) -> mlp.gate_proj, mlp.w1 -> mlp.up_proj    mlp.c_proj -> mlp.down_proj
    transformer.ln_f -> model.norm                 lm_head -> lm_head (untied)

A directory already in the Qwen2 layout (config.json `model_type: "qwen2"`, as `convert_hf.py
export --format qwen2` writes it) is loaded as it is, with `AutoModelForCausalLM.from_pretrained`
and no remote code.

Qwen2 is exactly Qwen v1 without the inference-time dynamic NTK and LogN scaling, so our model
runs with both off against it. With `trust_remote_code` the reference for a v1 directory is the
checkpoint's own modeling code (which keeps the config's flags). torch and transformers are
imported lazily: only the check needs them.
"""

from __future__ import annotations

import pathlib

import numpy as np

from qwen_jax.io import qwen2
from qwen_jax.io.convert import (
    ConversionError,
    HFCheckpoint,
    check_layout,
    load_hf_config,
    read_hf_config_json,
    resolve_source,
)
from qwen_jax.model.config import QwenConfig


def require_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConversionError(f"the PyTorch reference needs torch and transformers ({e}); "
                              "install them, e.g. pip install 'qwen_jax[test]'") from None
    return torch, transformers


def qwen2_config(config: QwenConfig, max_positions: int):
    """The transformers Qwen2Config of the same network (`qwen2.qwen2_config`) for a float32
    reference with eager attention, with room for `max_positions`."""
    _, transformers = require_torch()
    try:
        fields = qwen2.qwen2_config(config)
    except ValueError as e:
        raise ConversionError(f"the Qwen2 reference cannot run this model: {e}") from None
    fields.update(dtype="float32", max_position_embeddings=max(
        max_positions, config.max_position_embeddings))
    return transformers.Qwen2Config(**fields, attn_implementation="eager")


def read_tensors(hf_dir, dtype) -> dict:
    """Every tensor of a Hugging Face directory as torch `dtype`, read with the safetensors
    package (deliberately not with our own reader, so the check covers it too)."""
    torch, _ = require_torch()
    from safetensors import SafetensorError, safe_open

    hf_dir = pathlib.Path(hf_dir)
    files = sorted({path for path in HFCheckpoint(hf_dir).where.values()})
    tensors = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def build_qwen2(hf_dir, config: QwenConfig, max_positions: int):
    """Qwen2ForCausalLM in float32 holding the weights of `hf_dir`."""
    torch, transformers = require_torch()
    from transformers.models.qwen2 import modeling_qwen2

    tensors = read_tensors(hf_dir, torch.float32)
    check_layout(config, {k: tuple(v.shape) for k, v in tensors.items()}, hf_dir)
    cfg = qwen2_config(config, max_positions)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        model = transformers.Qwen2ForCausalLM(cfg)
    model.load_state_dict(qwen2.v1_to_qwen2_state_dict(tensors, config), strict=True,
                          assign=True)
    # inv_freq is a computed buffer, not a weight: build it for real, off the meta device
    model.model.rotary_emb = modeling_qwen2.Qwen2RotaryEmbedding(config=cfg)
    return model.eval()


def build_remote(hf_dir):
    """The checkpoint's own modeling code, in float32 (runs code from `hf_dir`)."""
    torch, transformers = require_torch()
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), trust_remote_code=True, fp32=True, bf16=False, fp16=False,
            use_flash_attn=False, **{dtype_key: torch.float32})
    except Exception as e:  # noqa: BLE001: remote code fails in its own ways
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"{hf_dir}: cannot load the checkpoint's own modeling code with "
                              f"transformers {transformers.__version__}: {type(e).__name__}: "
                              f"{first}") from None
    return model.eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    torch, _ = require_torch()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), use_cache=False)
    return out.logits.float().numpy()


def our_logits(params, config: QwenConfig, tokens: np.ndarray) -> np.ndarray:
    import jax

    from qwen_jax.model.transformer import Qwen

    with jax.default_matmul_precision(config.matmul_precision):
        logits, _ = jax.jit(lambda p, t: Qwen(config).apply({"params": p}, t))(params, tokens)
    return np.asarray(logits)


def compare(reference: np.ndarray, ours: np.ndarray) -> dict:
    """Max abs logit difference, mean KL(reference || ours) per position, top-1 agreement."""
    kls = []
    for ref_row, our_row in zip(reference.astype(np.float64), ours.astype(np.float64)):
        log_p = ref_row - _logsumexp(ref_row)
        log_q = our_row - _logsumexp(our_row)
        kls.append(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
    return {"max_abs_diff": float(np.max(np.abs(reference - ours))),
            "mean_kl": float(np.mean(kls)),
            "top1_agreement": float(np.mean(reference.argmax(-1) == ours.argmax(-1)))}


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def load_qwen2_dir(hf_dir):
    """A Qwen2-layout directory as transformers loads it natively, in float32 with eager
    attention; every weight must be there and used."""
    torch, transformers = require_torch()
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager",
            output_loading_info=True)
    except Exception as e:  # noqa: BLE001: transformers raises many kinds (config, files)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(f"{hf_dir}: transformers {transformers.__version__} cannot load "
                              f"it: {type(e).__name__}: {first}") from None
    finally:
        if bar:
            logging.enable_progress_bar()
    bad = {k: sorted(v)[:5] for k, v in info.items() if v}
    if bad:
        raise ConversionError(f"{hf_dir}: weights do not fit {type(model).__name__}: "
                              + "; ".join(f"{k} {v}" for k, v in bad.items()))
    return model.eval()


def qwen2_config_diff(config: QwenConfig, hf_config) -> dict:
    """The fields of a loaded transformers Qwen2 config that differ from the network `config`
    describes: {name: (ours, theirs)}."""
    try:
        expected = qwen2.qwen2_config(config)
    except ValueError as e:
        raise ConversionError(f"the Qwen2 layout cannot hold this model: {e}") from None
    rope = getattr(hf_config, "rope_parameters", None) or {}
    found = {k: getattr(hf_config, k, None) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
        "tie_word_embeddings")}
    found["head_dim"] = found["head_dim"] or hf_config.hidden_size // hf_config.num_attention_heads
    found["rope_theta"] = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 0.0)))
    found["sliding_window"] = (getattr(hf_config, "sliding_window", None)
                               if getattr(hf_config, "use_sliding_window", False) else None)
    return {k: (expected[k], v) for k, v in found.items() if expected[k] != v}


def run_check(hf_source, checkpoint_dir, length=512, batch=1, seed=0,
              trust_remote_code=False) -> dict:
    """Logits of the reference on `hf_source` vs ours on `checkpoint_dir` for random tokens."""
    _, transformers = require_torch()
    import jax

    from qwen_jax.io.checkpoint import CheckpointError, load_params

    patterns = ("*.json", "*.safetensors", "qwen.tiktoken") + (("*.py",) if trust_remote_code
                                                              else ())
    hf_dir = resolve_source(str(hf_source), patterns)
    native = read_hf_config_json(hf_dir).get("model_type") == "qwen2"
    if native:
        try:
            hf_config = transformers.AutoConfig.from_pretrained(str(hf_dir))
        except Exception as e:  # noqa: BLE001: transformers raises many kinds
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConversionError(f"{hf_dir}/config.json: not a Qwen2 config transformers "
                                  f"reads: {type(e).__name__}: {first}") from None
    else:
        hf_config = load_hf_config(hf_dir)
    params, config = load_params(checkpoint_dir, as_numpy=True)
    if native:
        diff = qwen2_config_diff(config, hf_config)
    else:
        fields = ("hidden_size", "num_attention_heads", "num_hidden_layers",
                  "intermediate_size", "vocab_size", "rotary_emb_base", "layer_norm_epsilon",
                  "seq_length")
        diff = {k: (getattr(config, k), getattr(hf_config, k)) for k in fields
                if getattr(config, k) != getattr(hf_config, k)}
    if diff:
        raise CheckpointError(f"{checkpoint_dir}: config differs from {hf_dir}/config.json in "
                              + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    config = config.replace(dtype="float32", param_dtype="float32", matmul_precision="highest",
                            attention_impl="xla", window_sizes=None)
    if native:
        model = load_qwen2_dir(hf_dir)
        config = config.replace(use_dynamic_ntk=False, use_logn_attn=False)
        notes = [f"reference: transformers {type(model).__name__} loaded from {hf_dir} "
                 "(float32, no remote code); ours run with use_dynamic_ntk=False, "
                 "use_logn_attn=False (Qwen2 has neither)"]
        if trust_remote_code:
            notes.append("--trust-remote-code ignored: transformers runs the Qwen2 layout "
                         "natively")
    elif trust_remote_code:
        model = build_remote(hf_dir)
        config = config.replace(use_dynamic_ntk=hf_config.use_dynamic_ntk,
                                use_logn_attn=hf_config.use_logn_attn)
        notes = [f"reference: the checkpoint's own modeling code ({type(model).__name__}, "
                 "float32); ours with the config's use_dynamic_ntk="
                 f"{config.use_dynamic_ntk}, use_logn_attn={config.use_logn_attn}"]
    else:
        model = build_qwen2(hf_dir, config, length)
        config = config.replace(use_dynamic_ntk=False, use_logn_attn=False)
        notes = ["reference: transformers Qwen2ForCausalLM (float32); ours run with "
                 "use_dynamic_ntk=False, use_logn_attn=False (Qwen2 has neither)"]
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))
    notes.append(f"input: {batch} x {length} random tokens (seed {seed}); ours in float32, "
                 "matmul precision 'highest'")
    reference = torch_logits(model, tokens)
    del model
    result = compare(reference, our_logits(params, config, tokens.astype(np.int32)))
    result["notes"] = notes
    return result
