"""A Hugging Face PEFT LoRA adapter read back onto a base checkpoint (the layouts and the
mapping: qwen_jax.io.peft). `import_adapter` writes a LoRA checkpoint (base + adapters + the
lora config) that `load_params` loads merged and `qwen_jax.io.peft.export_adapter` writes back
as the same tensors.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from qwen_jax.io import checkpoint
from qwen_jax.io.convert import DTYPES, SafetensorsFile
from qwen_jax.io.peft import (
    ADAPTER_CONFIG,
    ADAPTER_RECORD,
    ADAPTER_WEIGHTS,
    ALL_LINEAR,
    PREFIX,
    QWEN,
    QWEN2,
    TARGET_ORDER,
    UNSUPPORTED_OPTIONS,
    AdapterError,
    Layout,
    adapter_path,
    adapter_shapes,
    saved_modules,
    target_dims,
)
from qwen_jax.model import lora
from qwen_jax.model.config import ConfigError, QwenConfig


def _fail(where, why: str):
    raise AdapterError(f"{where}: {why}")


def read_adapter_config(peft_dir: pathlib.Path) -> dict:
    if not peft_dir.is_dir():
        _fail(peft_dir, "no such directory (expected a PEFT adapter: adapter_config.json + "
                        "adapter_model.safetensors)")
    path = peft_dir / ADAPTER_CONFIG
    if not path.is_file():
        _fail(peft_dir, f"not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(path, f"cannot read ({e})")
    if not isinstance(cfg, dict):
        _fail(path, "not a JSON object")
    if cfg.get("peft_type") != "LORA":
        _fail(path, f"peft_type {cfg.get('peft_type')!r}: only LoRA adapters (\"LORA\") can be "
                    "imported")
    for key, value in UNSUPPORTED_OPTIONS:
        if key in cfg and cfg[key] not in (value, None) and not (value == {} and not cfg[key]):
            _fail(path, f"{key}={cfg[key]!r} is not supported (our LoRA has one rank and "
                        "alpha for all modules, no bias, DoRA or layer selection)")
    if cfg.get("bias", "none") != "none":
        _fail(path, f"bias={cfg['bias']!r} is not supported (only \"none\")")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        _fail(path, f"r={r!r}: expected a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        _fail(path, f"lora_alpha={alpha!r}: expected a positive number")
    return cfg


def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def detect_layout(names, where) -> Layout:
    v1 = any(n.startswith(("transformer.h.", "transformer.wte.")) for n in names)
    v2 = any(n.startswith(("model.layers.", "model.embed_tokens.")) for n in names)
    if v1 == v2:
        example = next(iter(names), "(none)")
        _fail(where, f"{'no' if not v1 else 'mixed'} Qwen key names (e.g. {example!r}): "
                     "expected Qwen v1's (transformer.h.N...) or Qwen2's (model.layers.N...)")
    return QWEN if v1 else QWEN2


def _matches(entry: str, module: str) -> bool:
    """PEFT's rule for a list entry: it equals the module name or is a dot-separated suffix
    of it (a target_modules string instead is a regex the whole name must match)."""
    return module == entry or module.endswith("." + entry)


def _resolve_targets(cfg: dict, layout: Layout, config: QwenConfig, where) -> set[str]:
    """The module names under a layer that adapter_config.json's target_modules (and
    exclude_modules) select in `layout`, checked against what our LoRA can adapt."""
    targets = cfg.get("target_modules")
    excluded = cfg.get("exclude_modules") or []
    if isinstance(excluded, str):
        excluded = [excluded]
    adaptable = [m for m, _, _ in layout.modules]
    full = [layout.layer.format(i) + m for i in range(config.num_hidden_layers)
            for m in adaptable]
    others = list(layout.saved.values())  # embed / lm_head: not adaptable by our LoRA
    if not targets:
        _fail(where, "no target_modules")
    if targets == ALL_LINEAR:
        return set(adaptable)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            _fail(where, f"target_modules {targets!r}: not a valid regular expression ({e})")
        patterns = [targets]
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        patterns = targets
    else:
        _fail(where, f"target_modules={targets!r}: expected a list of names or a regex")

    def chosen(name, pattern):
        if any(_matches(e, name) for e in excluded):
            return False
        return _matches(pattern, name) if isinstance(targets, list) else re.fullmatch(
            pattern, name) is not None

    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in full if chosen(n, pattern)]
        if any(chosen(n, pattern) for n in others):
            _fail(where, f"target_modules {pattern!r} puts LoRA on the embedding or lm_head, "
                         "which our LoRA does not adapt (train them as modules_to_save)")
        if not hits:
            _fail(where, f"target module {pattern!r} does not exist in the model (the "
                         f"{layout.name} layout's adaptable modules: "
                         f"{', '.join(adaptable)})")
        selected.update(hits)
    per_layer = [{m for m in adaptable if layout.layer.format(i) + m in selected}
                 for i in range(config.num_hidden_layers)]
    if any(s != per_layer[0] for s in per_layer):
        _fail(where, "target_modules select different modules in different layers; our LoRA "
                     "adapts the same modules in every layer")
    chosen0 = per_layer[0]
    if layout is QWEN2:
        qkv = {m for m, t, _ in layout.modules if t == "c_attn"}
        if chosen0 & qkv and not qkv <= chosen0:
            _fail(where, f"target_modules adapt {sorted(chosen0 & qkv)} but not all of q_proj, "
                         "k_proj, v_proj: our c_attn adapter covers the three together (merge "
                         "with PEFT's merge_and_unload and import the merged model instead)")
    return chosen0


def import_adapter(peft_dir, base, target, overwrite: bool = False) -> list[str]:
    """Put the PEFT LoRA adapter `peft_dir` (either layout) onto the base checkpoint `base`
    (anything load_params reads) and save a LoRA checkpoint at `target`. Everything is
    checked before anything is written. Returns the lines to report."""
    from flax import traverse_util

    from qwen_jax.model.transformer import abstract_params

    peft_dir = pathlib.Path(peft_dir)
    cfg = read_adapter_config(peft_dir)
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            _fail(peft_dir, f"has adapter_model.bin but no {ADAPTER_WEIGHTS}: only safetensors "
                            "adapters are read (save with safe_serialization=True)")
        _fail(peft_dir, f"not a PEFT adapter (no {ADAPTER_WEIGHTS})")
    file = SafetensorsFile(weights)
    names = {_strip(n): n for n in file.tensors}
    layout = detect_layout(names, weights)
    base_config = checkpoint.load_config(base).replace(lora_rank=0, base_quant="none")
    where = peft_dir / ADAPTER_CONFIG

    # the layers the tensors name against the base's
    n_layers = base_config.num_hidden_layers
    prefix = layout.layer.split("{}")[0]
    layers = {int(n[len(prefix):].split(".", 1)[0]) for n in names
              if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    if layers and max(layers) >= n_layers:
        _fail(weights, f"an adapter for another model: it has {max(layers) + 1} layers but the "
                       f"base {base} has {n_layers}")

    modules = _resolve_targets(cfg, layout, base_config, where)
    chosen_targets = {t for m, t, _ in layout.modules if m in modules}
    ours = [t for t in TARGET_ORDER if t in chosen_targets]
    if {"attn.c_proj", "mlp.c_proj"} <= set(ours):
        ours = [t if t != "attn.c_proj" else "c_proj" for t in ours if t != "mlp.c_proj"]
    saved_names = cfg.get("modules_to_save") or []
    if not isinstance(saved_names, list):
        _fail(where, f"modules_to_save={saved_names!r}: expected a list")
    # PEFT wraps each module whose name ends with a modules_to_save entry
    which = {m: [mod for mod, full in layout.saved.items()
                 if isinstance(m, str) and (full == m or full.endswith("." + m))]
             for m in saved_names}
    unknown = [m for m, hits in which.items() if not hits]
    if unknown:
        _fail(where, f"modules_to_save {unknown} do not exist in the model (the {layout.name} "
                     f"layout's trainable modules: {', '.join(layout.saved_short.values())})")
    saved = saved_modules([mod for hits in which.values() for mod in hits])
    try:
        config = base_config.replace(lora_rank=cfg["r"], lora_alpha=float(cfg.get(
            "lora_alpha", 8)), lora_dropout=float(cfg.get("lora_dropout") or 0.0),
            lora_targets=tuple(ours), lora_rslora=bool(cfg.get("use_rslora", False)))
    except (ConfigError, TypeError, ValueError) as e:
        _fail(where, f"does not describe a LoRA we can hold: {e}")

    # the tensors: exactly the expected names, with the adapter's rank and the base's shapes
    expected = adapter_shapes(config, layout, saved)
    missing = [n for n in expected if n not in names]
    unexpected = [n for n in names if n not in expected]
    if unexpected:
        more = " ..." if len(unexpected) > 3 else ""
        _fail(weights, f"unexpected tensor(s) {unexpected[:3]}{more}"
                       f" (not an adapter of target_modules {cfg.get('target_modules')!r} or of "
                       f"modules_to_save {saved_names} in a {n_layers}-layer model)")
    if missing:
        _fail(weights, f"missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                       f"(target_modules {cfg.get('target_modules')!r}, modules_to_save "
                       f"{saved_names})")
    r = config.lora_rank
    for name, want in expected.items():
        got = tuple(file.tensors[names[name]][1])
        rank_axis = (0 if name.endswith(".lora_A.weight") else
                     1 if name.endswith(".lora_B.weight") else None)
        if rank_axis is not None and len(got) == 2 and got[rank_axis] != r:
            rank = got[rank_axis]
            _fail(weights, f"r={r} in {ADAPTER_CONFIG} but tensor {names[name]!r} has rank {rank} "
                           f"(shape {list(got)})")
        if got != want:
            _fail(weights, f"an adapter for another model: tensor {names[name]!r} has shape "
                           f"{list(got)} but the base {base} implies {list(want)}")

    # read the adapter (small) and check q/k/v share lora_A, before the base is loaded
    dtype = DTYPES[config.param_dtype]

    def read(name):
        raw = file.read(names[name], DTYPES[file.dtype(names[name])])
        return raw.astype(dtype, copy=False), raw.dtype

    lossy = set()
    flat: dict = {}
    targets = set(lora.expand_targets(config.lora_targets))
    for t in targets:
        ins, outs = target_dims(t, config)
        path = adapter_path(t)
        flat[path + (lora.LORA_A,)] = np.zeros((n_layers, *ins, r), dtype)
        flat[path + (lora.LORA_B,)] = np.zeros((n_layers, r, *outs), dtype)
    for i in range(n_layers):
        shared_a = None
        for module, t, part in layout.modules:
            if t not in targets:
                continue
            name = layout.layer.format(i) + module
            path = adapter_path(t)
            ins, outs = target_dims(t, config)
            a, a_src = read(name + ".lora_A.weight")
            b, b_src = read(name + ".lora_B.weight")
            lossy |= {a_src, b_src} - {np.dtype(dtype)}
            if part is not None:
                if shared_a is None:
                    shared_a = (a, name)
                elif not np.array_equal(a, shared_a[0]):
                    _fail(weights, f"{name}.lora_A differs from {shared_a[1]}.lora_A: our c_attn "
                                   "adapter has one lora_A shared by q, k and v, so this adapter "
                                   "cannot be represented (merge it with PEFT's merge_and_unload "
                                   "and import the merged model instead)")
                flat[path + (lora.LORA_A,)][i] = a.T.reshape(*ins, r)
                flat[path + (lora.LORA_B,)][i][:, part] = b.T.reshape(r, *outs[1:])
            else:
                flat[path + (lora.LORA_A,)][i] = a.T.reshape(*ins, r)
                flat[path + (lora.LORA_B,)][i] = b.T.reshape(r, *outs)
    trained = {}
    for m in saved:
        trained[m], src = read(layout.saved[m] + ".weight")
        lossy |= {src} - {np.dtype(dtype)}

    # the base, then its copy with the adapters (and the modules trained fully)
    params, loaded = checkpoint.load_params(base, as_numpy=True)
    notes = []
    if checkpoint.load_config(base).lora_rank:
        notes.append(f"note: the base {base} is itself a LoRA model: its adapters were merged "
                     "into the base first")
    base_flat = traverse_util.flatten_dict(params)
    base_flat.update(flat)
    if "embed" in trained:
        base_flat[("embed", "embedding")] = trained["embed"]
    if "lm_head" in trained:
        base_flat[("lm_head", "kernel")] = np.ascontiguousarray(trained["lm_head"].T)
    want = traverse_util.flatten_dict(abstract_params(config))
    assert set(want) == set(base_flat) and all(
        tuple(want[k].shape) == base_flat[k].shape for k in want), "internal: layout mismatch"
    record = {"adapter": str(peft_dir), "layout": layout.name,
              "base_model_name_or_path": cfg.get("base_model_name_or_path") or "",
              "modules_to_save": list(saved)}
    checkpoint.save_checkpoint(
        target, traverse_util.unflatten_dict(base_flat), config, overwrite=overwrite,
        hf_source=checkpoint.load_hf_source(base),
        side_files_from=checkpoint.side_files_dir(base),
        extra_files={ADAPTER_RECORD: json.dumps(record, indent=2) + "\n"})
    trained_names = [layout.saved_short[m] for m in saved]
    lines = [f"imported {peft_dir} ({layout.name} layout) onto {base} -> {target}: LoRA r={r}, "
             f"lora_alpha={config.lora_alpha:g}{', rsLoRA' if config.lora_rslora else ''}, "
             f"targets {list(config.lora_targets)}"
             f"{', modules_to_save ' + str(trained_names) if saved else ''}"]
    if lossy:
        notes.append(f"note: the adapter's {sorted(d.name for d in lossy)} tensors were cast to "
                     f"the base's {config.param_dtype}")
    return lines + notes
