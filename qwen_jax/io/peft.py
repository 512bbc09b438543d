"""LoRA adapters in Hugging Face PEFT's format, out of a LoRA run and back onto a base.

A PEFT LoRA adapter is a directory with `adapter_config.json` (r, lora_alpha, target_modules,
modules_to_save, ...) and `adapter_model.safetensors`, whose keys are the base model's module
names under `base_model.model.`, each adapted torch Linear [out, in] with

    <module>.lora_A.weight [r, in]     <module>.lora_B.weight [out, r]

(PEFT adds scale * B A to the weight; scale = lora_alpha / r, rsLoRA lora_alpha / sqrt(r), as
ours). A module trained fully (modules_to_save) is stored as its own weight, `<module>.weight`.
Our adapters (qwen_jax/model/lora.py, stacked on a leading layer axis L) in the two layouts
`convert_hf.py export` writes (per layer i; H hidden, N heads of D, F the MLP width):

    ours                            qwen (v1), transformer.h.{i}.    qwen2, model.layers.{i}.
    attn/c_attn_lora a [H, r]       attn.c_attn  A = a^T             self_attn.{q,k,v}_proj
                     b [r, 3, N, D]              B = b as [3H, r],   A = a^T (the same for all
                                                 rows q | k | v      three), B = b[:, j] as [H, r]
    attn/o/lora a [N, D, r], b [r, H]   attn.c_proj                  self_attn.o_proj
    mlp/up/lora   (w1)                  mlp.w1                       mlp.up_proj
    mlp/gate/lora (w2)                  mlp.w2                       mlp.gate_proj
    mlp/down/lora                       mlp.c_proj                   mlp.down_proj
    embed (modules_to_save)             transformer.wte              model.embed_tokens
    lm_head                             lm_head                      lm_head

and every other module as A = a reshaped [in, r] transposed, B = b reshaped [r, out] transposed,
so export and import are transposes and reshapes only: bit-exact both ways. A Qwen2 adapter
whose q, k and v lora_A differ has no shared c_attn A and cannot be imported.

`export_adapter` writes a LoRA run's (or checkpoint's) adapters; `peft_import.import_adapter`
puts an adapter onto a base checkpoint as a LoRA checkpoint (base + adapters + lora config) that
`load_params` loads merged and `export_adapter` writes back as the same tensors. An imported
checkpoint records the adapter's base_model_name_or_path and modules_to_save in ADAPTER_RECORD.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from qwen_jax.io import checkpoint
from qwen_jax.io.convert import DTYPES, ConversionError, write_safetensors
from qwen_jax.model import lora
from qwen_jax.model.config import QwenConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_RECORD = "peft_adapter.json"  # in an imported checkpoint: what export needs back
PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer
# The release's target names in our canonical order.
TARGET_ORDER = ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")
# adapter_config.json options that would change what the tensors mean: (key, value it must have)
UNSUPPORTED_OPTIONS = (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False),
                ("rank_pattern", {}), ("alpha_pattern", {}), ("layers_to_transform", None),
                ("layer_replication", None), ("target_parameters", None),
                ("trainable_token_indices", None), ("use_qalora", False))


class AdapterError(ConversionError):
    """A PEFT adapter (or a run) that cannot be converted; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A layout's module names: `modules` = (name under a layer, our target, part of c_attn)."""

    name: str
    layer: str  # the prefix of layer i's modules, with {} for i
    modules: tuple[tuple[str, str, int | None], ...]
    saved: dict  # our modules_to_save module ("embed", "lm_head") -> its module name
    saved_short: dict  # the same -> its name in adapter_config.json's modules_to_save

    def target_name(self, module: str) -> str:
        return module.rsplit(".", 1)[-1]


QWEN = Layout(
    "qwen", "transformer.h.{}.",
    (("attn.c_attn", "c_attn", None), ("attn.c_proj", "attn.c_proj", None),
     ("mlp.w1", "w1", None), ("mlp.w2", "w2", None), ("mlp.c_proj", "mlp.c_proj", None)),
    {"embed": "transformer.wte", "lm_head": "lm_head"}, {"embed": "wte", "lm_head": "lm_head"})
QWEN2 = Layout(
    "qwen2", "model.layers.{}.",
    (("self_attn.q_proj", "c_attn", 0), ("self_attn.k_proj", "c_attn", 1),
     ("self_attn.v_proj", "c_attn", 2), ("self_attn.o_proj", "attn.c_proj", None),
     ("mlp.gate_proj", "w2", None), ("mlp.up_proj", "w1", None),
     ("mlp.down_proj", "mlp.c_proj", None)),
    {"embed": "model.embed_tokens", "lm_head": "lm_head"},
    {"embed": "embed_tokens", "lm_head": "lm_head"})
LAYOUTS = {"qwen": QWEN, "qwen2": QWEN2}


# ----------------------------------------------------------------------- shared
def adapter_path(target: str) -> tuple[str, ...]:
    parent, module = lora.TARGET_MODULES[target]
    return ("layers", parent, module) if module == lora.C_ATTN else (
        "layers", parent, module, lora.ADAPTER)


def target_dims(target: str, config: QwenConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Our (A's input dims, B's output dims) of a target, without the layer and rank axes."""
    h, n, d, f = (config.hidden_size, config.num_attention_heads, config.head_dim,
                  config.mlp_width)
    return {"c_attn": ((h,), (3, n, d)), "attn.c_proj": ((n, d), (h,)),
            "mlp.c_proj": ((f,), (h,)), "w1": ((h,), (f,)), "w2": ((h,), (f,))}[target]


def _torch_shapes(target: str, part: int | None, config: QwenConfig, r: int):
    """(lora_A shape, lora_B shape) of one module in PEFT's [out, in] orientation."""
    ins, outs = target_dims(target, config)
    if part is not None:
        outs = outs[1:]
    return (r, math.prod(ins)), (math.prod(outs), r)


def saved_modules(names) -> tuple[str, ...]:
    """modules_to_save as recorded by a run ("wte", "embed", "lm_head") -> ours, in order."""
    ours = {lora.SAVED_MODULES[m] for m in names}
    return tuple(m for m in ("embed", "lm_head") if m in ours)


def lora_record(directory) -> tuple[tuple[str, ...], str]:
    """(our modules_to_save, base_model_name_or_path) of a LoRA run (its init_from) or of a
    checkpoint made by `import_adapter`; ((), "") for other checkpoints."""
    located = checkpoint.locate(directory)
    if located.step_dir is not None:
        run = checkpoint.step_record(located.step_dir).get("config") or {}
        saved = (run.get("lora") or {}).get("modules_to_save") or ()
        return saved_modules(saved), str(run.get("init_from") or "")
    path = located.root / ADAPTER_RECORD
    if not path.is_file():
        return (), ""
    try:
        record = json.loads(path.read_text())
        return (saved_modules(record.get("modules_to_save") or ()),
                str(record.get("base_model_name_or_path") or ""))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: not a valid adapter record ({e})") from None


# ----------------------------------------------------------------------- export
def target_modules(targets, layout: Layout) -> list[str]:
    """adapter_config.json's target_modules for our targets: suffixes PEFT matches exactly
    those modules ("c_proj" only when both c_proj modules are adapted)."""
    targets = set(lora.expand_targets(targets))
    if layout is QWEN2:
        return [layout.target_name(m) for m, t, _ in layout.modules if t in targets]
    out = []
    for t in TARGET_ORDER:
        if t not in targets:
            continue
        if t.endswith("c_proj") and {"attn.c_proj", "mlp.c_proj"} <= targets:
            t = "c_proj"
        if t not in out:
            out.append(t)
    return out


def adapter_config(config: QwenConfig, layout: Layout, modules_to_save=(),
                   base_model: str = "") -> dict:
    """The adapter_config.json of a LoRA model in `layout`."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.lora_rslora,
        "target_modules": target_modules(config.lora_targets, layout),
        "modules_to_save": ([layout.saved_short[m] for m in modules_to_save]
                            if modules_to_save else None),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def adapter_shapes(config: QwenConfig, layout: Layout, modules_to_save=()) -> dict:
    """Every tensor of the adapter file (names without PREFIX) and its shape, in file order."""
    targets = set(lora.expand_targets(config.lora_targets))
    shapes = {}
    for i in range(config.num_hidden_layers):
        for module, target, part in layout.modules:
            if target in targets:
                a, b = _torch_shapes(target, part, config, config.lora_rank)
                name = layout.layer.format(i) + module
                shapes[name + ".lora_A.weight"], shapes[name + ".lora_B.weight"] = a, b
    v, h = config.vocab_size, config.hidden_size
    for m in modules_to_save:
        shapes[layout.saved[m] + ".weight"] = (v, h)
    return shapes


def adapter_tensors(params, config: QwenConfig, layout: Layout, modules_to_save=()):
    """(name, array) of the adapter file in `adapter_shapes` order, from a LoRA model's
    unmerged parameters (stacked layers)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    targets = set(lora.expand_targets(config.lora_targets))
    r = config.lora_rank
    for i in range(config.num_hidden_layers):
        for module, target, part in layout.modules:
            if target not in targets:
                continue
            path = adapter_path(target)
            a = np.asarray(flat[path + (lora.LORA_A,)][i])
            b = np.asarray(flat[path + (lora.LORA_B,)][i])
            if part is not None:
                b = b[:, part]
            name = layout.layer.format(i) + module
            yield name + ".lora_A.weight", a.reshape(-1, r).T
            yield name + ".lora_B.weight", b.reshape(r, -1).T
    for m in modules_to_save:
        x = np.asarray(params["embed"]["embedding"] if m == "embed"
                       else params["lm_head"]["kernel"])
        yield layout.saved[m] + ".weight", x if m == "embed" else x.T


def export_adapter(source, target, layout: str = "qwen", dtype: str | None = None,
                   overwrite: bool = False) -> list[str]:
    """Write the PEFT adapter of the LoRA model `source` (a run or checkpoint) into the
    directory `target` (written under a temporary name, renamed when complete). Returns the
    lines to report."""
    lay = LAYOUTS[layout]
    params, config = checkpoint.load_lora_params(source)
    saved, base_model = lora_record(source)
    shapes = adapter_shapes(config, lay, saved)
    tensors = ((PREFIX + name, x) for name, x in adapter_tensors(params, config, lay, saved))
    np_dtype = DTYPES[dtype or config.param_dtype]
    cfg = adapter_config(config, lay, saved, base_model)
    with checkpoint.atomic_directory(target, overwrite=overwrite) as tmp:
        names = write_safetensors(tmp, {PREFIX + k: v for k, v in shapes.items()}, tensors,
                                  np_dtype, max_shard_bytes=2**62)
        os.replace(tmp / names[0], tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    per_layer = sum(k.endswith("lora_A.weight") for k in shapes) // config.num_hidden_layers
    lines = [f"exported the adapters of {source} -> {target}: PEFT LoRA ({lay.name} layout), "
             f"r={config.lora_rank}, lora_alpha={config.lora_alpha:g}"
             f"{', rsLoRA' if config.lora_rslora else ''}, {per_layer} modules in each of "
             f"{config.num_hidden_layers} layers (target_modules {cfg['target_modules']})"
             f"{', modules_to_save ' + str(cfg['modules_to_save']) if saved else ''}, "
             f"{np.dtype(np_dtype).name}"]
    if config.base_quant != "none":
        lines.append(f"note: Q-LoRA: these adapters were trained against the {config.base_quant}"
                     f"-quantised base (group {config.base_quant_group}); on the float base they "
                     "give a slightly different model than the run's merged one")
    if not base_model:
        lines.append("note: base_model_name_or_path is empty (the run has no init_from): load "
                     "the adapter onto the base explicitly")
    return lines
