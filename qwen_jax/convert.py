"""Released Hugging Face Qwen v1 checkpoints in and out.

The original layout (per layer i, under `transformer.h.{i}.`):

    attn.c_attn.weight [3H, H], rows q | k | v      -> attn/{q,k,v}/kernel [H, N, D] (transposed)
    attn.c_attn.bias   [3H]                         -> attn/{q,k,v}/bias   [N, D]
    attn.c_proj.weight [H, H]                       -> attn/o/kernel       [N, D, H]
    mlp.w1.weight      [F, H]  (plain branch)       -> mlp/up/kernel       [H, F]
    mlp.w2.weight      [F, H]  (SiLU gate)          -> mlp/gate/kernel     [H, F]
    mlp.c_proj.weight  [H, F]                       -> mlp/down/kernel     [F, H]
    ln_1.weight, ln_2.weight [H]                    -> ln_1/weight, ln_2/weight
    transformer.wte.weight [V, H] -> embed/embedding; transformer.ln_f.weight -> ln_f/weight;
    lm_head.weight [V, H] -> lm_head/kernel [H, V] (untied)

Per-layer tensors are stacked on a leading layer axis. Import reads tensor by tensor into
preallocated stacked arrays, so peak host memory stays near the size of the output.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from qwen_jax.config import ConfigError, QwenConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names file and key."""


def hf_shapes(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original layout and the shape the config implies."""
    h, f, v = config.hidden_size, config.mlp_width, config.vocab_size
    shapes = {"transformer.wte.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (h,),
            p + "attn.c_attn.weight": (3 * h, h),
            p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h),
            p + "ln_2.weight": (h,),
            p + "mlp.w1.weight": (f, h),
            p + "mlp.w2.weight": (f, h),
            p + "mlp.c_proj.weight": (h, f),
        })
    shapes["transformer.ln_f.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


# ----------------------------------------------------------------------------- reading
def weight_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = hf_dir / INDEX_FILE
    single = hf_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConversionError(f"{path}: missing shard file (listed in {index})")
        return files
    if single.is_file():
        return {name: single for name in _keys_of(single)}
    raise ConversionError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _keys_of(path: pathlib.Path) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


class _Reader:
    """Opens each shard once and reads single tensors, with the file named in every error."""

    def __init__(self, files: dict[str, pathlib.Path]):
        self.files = files
        self._open: dict[pathlib.Path, object] = {}

    def _handle(self, path):
        if path not in self._open:
            try:
                self._open[path] = safe_open(path, framework="numpy")
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
        return self._open[path]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, path in self.files.items():
            handle = self._handle(path)
            if name not in handle.keys():
                raise ConversionError(f"{path}: has no tensor {name!r} (the index says it does)")
            out[name] = tuple(handle.get_slice(name).get_shape())
        return out

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path}: cannot read tensor {name!r} ({e})") from None


def check_layout(config: QwenConfig, found: dict[str, tuple[int, ...]], where) -> None:
    expected = hf_shapes(config)
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    if missing:
        raise ConversionError(f"{where}: missing tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} required by config.json "
                              f"({config.num_hidden_layers} layers)")
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} not in a Qwen v1 model "
                              f"with {config.num_hidden_layers} layers (does config.json match "
                              "the weights?)")
    for name in sorted(expected, key=_natural):
        if tuple(found[name]) != expected[name]:
            raise ConversionError(f"{where}: tensor {name!r} has shape {list(found[name])} but "
                                  f"config.json implies {list(expected[name])}")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def load_hf_params(hf_dir, config: QwenConfig, dtype: str | None = None) -> dict:
    """Read an original-layout checkpoint into our parameter pytree of numpy arrays."""
    hf_dir = pathlib.Path(hf_dir)
    np_dtype = DTYPES[dtype or config.param_dtype]
    reader = _Reader(weight_files(hf_dir))
    check_layout(config, reader.shapes(), hf_dir)
    h, n, d, f, v = (config.hidden_size, config.num_attention_heads, config.head_dim,
                     config.mlp_width, config.vocab_size)
    n_layers = config.num_hidden_layers

    def stacked(*shape):
        return np.empty((n_layers, *shape), np_dtype)

    layers = {
        "ln_1": {"weight": stacked(h)},
        "ln_2": {"weight": stacked(h)},
        "attn": {name: {"kernel": stacked(h, n, d), "bias": stacked(n, d)} for name in "qkv"},
        "mlp": {"gate": {"kernel": stacked(h, f)}, "up": {"kernel": stacked(h, f)},
                "down": {"kernel": stacked(f, h)}},
    }
    layers["attn"]["o"] = {"kernel": stacked(n, d, h)}
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        layers["ln_1"]["weight"][i] = reader.get(p + "ln_1.weight")
        layers["ln_2"]["weight"][i] = reader.get(p + "ln_2.weight")
        c_attn = reader.get(p + "attn.c_attn.weight")
        bias = reader.get(p + "attn.c_attn.bias")
        for j, name in enumerate("qkv"):
            rows = slice(j * h, (j + 1) * h)
            layers["attn"][name]["kernel"][i] = c_attn[rows].T.reshape(h, n, d)
            layers["attn"][name]["bias"][i] = bias[rows].reshape(n, d)
        del c_attn
        layers["attn"]["o"]["kernel"][i] = reader.get(p + "attn.c_proj.weight").T.reshape(n, d, h)
        layers["mlp"]["up"]["kernel"][i] = reader.get(p + "mlp.w1.weight").T
        layers["mlp"]["gate"]["kernel"][i] = reader.get(p + "mlp.w2.weight").T
        layers["mlp"]["down"]["kernel"][i] = reader.get(p + "mlp.c_proj.weight").T
    embedding = np.empty((v, h), np_dtype)
    embedding[...] = reader.get("transformer.wte.weight")
    lm_head = np.empty((h, v), np_dtype)
    lm_head[...] = reader.get("lm_head.weight").T
    ln_f = reader.get("transformer.ln_f.weight").astype(np_dtype)
    return {"embed": {"embedding": embedding}, "layers": layers, "ln_f": {"weight": ln_f},
            "lm_head": {"kernel": lm_head}}


# ----------------------------------------------------------------------------- writing
def hf_tensors(params, config: QwenConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameter pytree -> (name, array) in the original layout, one tensor at a time."""
    h = config.hidden_size
    layers = params["layers"]
    yield "transformer.wte.weight", np.asarray(params["embed"]["embedding"])
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        attn = layers["attn"]
        yield p + "ln_1.weight", np.asarray(layers["ln_1"]["weight"][i])
        yield p + "attn.c_attn.weight", np.concatenate(
            [np.asarray(attn[name]["kernel"][i]).reshape(h, h).T for name in "qkv"], axis=0)
        yield p + "attn.c_attn.bias", np.concatenate(
            [np.asarray(attn[name]["bias"][i]).reshape(h) for name in "qkv"])
        yield p + "attn.c_proj.weight", np.ascontiguousarray(
            np.asarray(attn["o"]["kernel"][i]).reshape(h, h).T)
        yield p + "ln_2.weight", np.asarray(layers["ln_2"]["weight"][i])
        yield p + "mlp.w1.weight", np.ascontiguousarray(np.asarray(layers["mlp"]["up"]["kernel"][i]).T)
        yield p + "mlp.w2.weight", np.ascontiguousarray(
            np.asarray(layers["mlp"]["gate"]["kernel"][i]).T)
        yield p + "mlp.c_proj.weight", np.ascontiguousarray(
            np.asarray(layers["mlp"]["down"]["kernel"][i]).T)
    yield "transformer.ln_f.weight", np.asarray(params["ln_f"]["weight"])
    yield "lm_head.weight", np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)


def write_hf(out_dir, params, config: QwenConfig, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write original-layout safetensors (sharded with an index above `max_shard_bytes`)."""
    from safetensors.numpy import save_file

    out_dir = pathlib.Path(out_dir)
    shapes = hf_shapes(config)
    itemsize = np.dtype(DTYPES[config.param_dtype]).itemsize
    sizes = {name: int(np.prod(shape)) * itemsize for name, shape in shapes.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name in shapes:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    shard_of = {name: k for k, shard in enumerate(shards) for name in shard}
    pending: dict[str, np.ndarray] = {}
    current = 0
    for name, array in hf_tensors(params, config):
        if shard_of[name] != current:
            save_file(pending, out_dir / names[current], metadata={"format": "pt"})
            pending, current = {}, shard_of[name]
        pending[name] = array
    save_file(pending, out_dir / names[current], metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: names[shard_of[name]] for name in shapes}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")


# ----------------------------------------------------------------------------- sources
def resolve_source(source: str) -> pathlib.Path:
    """A local directory, or a Hugging Face repo id downloaded through huggingface_hub."""
    path = pathlib.Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{source}: expected a directory holding config.json and "
                              "safetensors weights")
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ConversionError(f"{source}: no such directory (and not a Hugging Face repo id)")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "qwen.tiktoken"]))
    except Exception as e:  # noqa: BLE001: the hub raises many kinds; all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE") or "connect" in str(e).lower()
        hint = " (offline: download it elsewhere and pass the directory)" if offline else ""
        raise ConversionError(f"{source}: cannot download from the Hugging Face Hub{hint}: "
                              f"{type(e).__name__}: {e}") from None


def load_hf_config(hf_dir: pathlib.Path, dtype: str | None = None) -> QwenConfig:
    overrides = {}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        overrides = {"param_dtype": dtype, "dtype": dtype}
    try:
        return QwenConfig.from_hf(hf_dir / "config.json", **overrides)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
