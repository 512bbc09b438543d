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

Per-layer tensors are stacked on a leading layer axis. The safetensors files are read and written
here with plain file I/O in row blocks rather than through the safetensors package: its
`safe_open` memory-maps whole shards (every page read stays in the resident set until the shard
is closed) and its `save_file` wants a whole shard in memory. So import peaks near the size of
the output parameters and export near the size of one tensor, however large the model.
`write_safetensors` writes any layout from its tensor shapes and a tensor iterator: the
original one here (`write_hf`), transformers' Qwen2 one in `qwen2.write_qwen2`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from qwen_jax.model.config import ConfigError, QwenConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# safetensors dtype codes (https://github.com/huggingface/safetensors, format section).
_ST_CODES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_BLOCK_BYTES = 16 * 2**20  # one read buffer: bounds the extra memory of a transposing import


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
class SafetensorsFile:
    """The validated header of one .safetensors file; tensors are read in row blocks."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
                if not 2 <= n <= min(size - 8, 100 * 2**20):
                    self._fail("not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._fail("not a safetensors file (header is not JSON)")
        if not isinstance(header, dict):
            self._fail("not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}
        end = 0
        for name, entry in header.items():
            try:
                code, shape = entry["dtype"], tuple(entry["shape"])
                begin, stop = entry["data_offsets"]
                nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[code]
                fits = stop - begin == nbytes and begin >= 0
            except (KeyError, TypeError, ValueError):
                self._fail(f"malformed header entry for tensor {name!r}: {entry!r:.200}")
            if not fits:
                self._fail(f"tensor {name!r}: data_offsets {[begin, stop]} do not fit its "
                           f"shape {list(shape)} and dtype {code}")
            self.tensors[name] = (code, shape, begin)
            end = max(end, stop)
        if self.data_start + end > size:
            self._fail(f"truncated: the header describes {self.data_start + end} bytes but the "
                       f"file has {size}")

    def _fail(self, why: str):
        raise ConversionError(f"{self.path}: {why}")

    def dtype(self, name: str) -> str:
        code = self.tensors[name][0]
        if code not in _ST_CODES:
            self._fail(f"tensor {name!r} has dtype {code}; expected one of {sorted(_ST_CODES)}")
        return _ST_CODES[code]

    def row_blocks(self, name: str, dtype) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows as `dtype`) over the tensor, about _BLOCK_BYTES at a time. One
        buffer is reused: a block is valid only until the next one is requested."""
        code, shape, begin = self.tensors[name]
        src = np.dtype(DTYPES[self.dtype(name)])
        rows = shape[0] if shape else 1
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * src.itemsize
        step = max(1, _BLOCK_BYTES // max(1, row_bytes))
        buf = np.empty(min(step, rows) * row_bytes, np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                for r0 in range(0, rows, step):
                    count = min(step, rows - r0)
                    view = buf[:count * row_bytes]
                    if f.readinto(view) != view.size:
                        self._fail(f"truncated while reading tensor {name!r}")
                    block = view.view(src).reshape((count,) + tuple(shape[1:]))
                    yield r0, block.astype(dtype, copy=False)
        except OSError as e:
            raise ConversionError(f"{self.path}: cannot read tensor {name!r} ({e})") from None

    def read(self, name: str, dtype) -> np.ndarray:
        shape = self.tensors[name][1]
        out = np.empty(shape, dtype)
        flat = out.reshape((shape[0] if shape else 1, -1))
        for r0, block in self.row_blocks(name, dtype):
            flat[r0:r0 + block.shape[0]] = block.reshape(block.shape[0], -1)
        return out


class HFCheckpoint:
    """A Hugging Face directory's weights: every tensor name -> the file that holds it."""

    def __init__(self, hf_dir):
        self.dir = pathlib.Path(hf_dir)
        index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = {str(k): self.dir / str(v) for k, v in dict(weight_map).items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {}
            for path in sorted(set(names.values())):
                if not path.is_file():
                    raise ConversionError(f"{path}: missing shard file (listed in {index})")
                self.files[path] = SafetensorsFile(path)
            for name, path in names.items():
                if name not in self.files[path].tensors:
                    raise ConversionError(f"{path}: has no tensor {name!r} (the index says "
                                          "it does)")
            self.where = dict(names)
        elif single.is_file():
            self.files = {single: SafetensorsFile(single)}
            self.where = {name: single for name in self.files[single].tensors}
        else:
            raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def file(self, name: str) -> SafetensorsFile:
        return self.files[self.where[name]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.file(name).tensors[name][1] for name in self.where}

    def stored_dtype(self) -> str:
        """The dtype the weights are stored in (the widest one if they are mixed)."""
        found = {self.file(name).dtype(name) for name in self.where}
        if len(found) == 1:
            return found.pop()
        return "float32"


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
    for name in expected:  # model order: the embedding first
        if tuple(found[name]) != expected[name]:
            raise ConversionError(f"{where}: tensor {name!r} has shape {list(found[name])} but "
                                  f"config.json implies {list(expected[name])}")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def load_hf_params(hf_dir, config: QwenConfig, dtype: str | None = None) -> dict:
    """Read an original-layout checkpoint into our parameter pytree of numpy arrays.

    Every output array is allocated once and filled block by block (transposing as it goes),
    so peak memory is the output plus one read buffer."""
    ckpt = HFCheckpoint(hf_dir)
    check_layout(config, ckpt.shapes(), ckpt.dir)
    np_dtype = DTYPES[dtype or config.param_dtype]
    h, n, d, f, v = (config.hidden_size, config.num_attention_heads, config.head_dim,
                     config.mlp_width, config.vocab_size)
    n_layers = config.num_hidden_layers

    def stacked(*shape):
        return np.empty((n_layers, *shape), np_dtype)

    def copy(name, dest):
        for r0, block in ckpt.file(name).row_blocks(name, np_dtype):
            dest[r0:r0 + len(block)] = block

    def transpose(name, *dests):
        # A torch Linear [out, in] -> our [in, out]; consecutive row ranges of the tensor fill
        # the 2-D destinations in turn (c_attn: q | k | v), in one pass over the file.
        starts = np.cumsum([0] + [dest.shape[1] for dest in dests])
        for r0, block in ckpt.file(name).row_blocks(name, np_dtype):
            for dest, start in zip(dests, starts):
                lo, hi = max(r0, start), min(r0 + len(block), start + dest.shape[1])
                if lo < hi:
                    dest[:, lo - start:hi - start] = block[lo - r0:hi - r0].T

    layers = {
        "ln_1": {"weight": stacked(h)},
        "ln_2": {"weight": stacked(h)},
        "attn": {name: {"kernel": stacked(h, n, d), "bias": stacked(n, d)} for name in "qkv"},
        "mlp": {"gate": {"kernel": stacked(h, f)}, "up": {"kernel": stacked(h, f)},
                "down": {"kernel": stacked(f, h)}},
    }
    layers["attn"]["o"] = {"kernel": stacked(n, d, h)}
    attn, mlp = layers["attn"], layers["mlp"]
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        copy(p + "ln_1.weight", layers["ln_1"]["weight"][i])
        copy(p + "ln_2.weight", layers["ln_2"]["weight"][i])
        bias = ckpt.file(p + "attn.c_attn.bias").read(p + "attn.c_attn.bias", np_dtype)
        transpose(p + "attn.c_attn.weight",
                  *(attn[name]["kernel"][i].reshape(h, h) for name in "qkv"))
        for j, name in enumerate("qkv"):
            attn[name]["bias"][i] = bias[j * h:(j + 1) * h].reshape(n, d)
        transpose(p + "attn.c_proj.weight", attn["o"]["kernel"][i].reshape(h, h))
        transpose(p + "mlp.w1.weight", mlp["up"]["kernel"][i])
        transpose(p + "mlp.w2.weight", mlp["gate"]["kernel"][i])
        transpose(p + "mlp.c_proj.weight", mlp["down"]["kernel"][i])
    embedding, lm_head = np.empty((v, h), np_dtype), np.empty((h, v), np_dtype)
    ln_f = np.empty(h, np_dtype)
    copy("transformer.wte.weight", embedding)
    transpose("lm_head.weight", lm_head)
    copy("transformer.ln_f.weight", ln_f)
    return {"embed": {"embedding": embedding}, "layers": layers, "ln_f": {"weight": ln_f},
            "lm_head": {"kernel": lm_head}}


# ----------------------------------------------------------------------------- writing
def layer_params(params, i: int):
    """Layer i's subtree from either parameter layout: stacked (`params["layers"]`, a leading
    layer axis) or one subtree per layer (`params["layers_<i>"]`, QwenConfig.scan_layers=False)."""
    if "layers" not in params:
        return params[f"layers_{i}"]

    def pick(tree):
        return {k: pick(v) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]

    return pick(params["layers"])


def hf_tensors(params, config: QwenConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameter pytree -> (name, array) in the original layout, one tensor at a time."""
    h = config.hidden_size

    def t(x):
        return np.ascontiguousarray(np.asarray(x).T)

    yield "transformer.wte.weight", np.asarray(params["embed"]["embedding"])
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        layer = layer_params(params, i)  # either layout: stacked or one subtree per layer
        attn, mlp = layer["attn"], layer["mlp"]
        yield p + "ln_1.weight", np.asarray(layer["ln_1"]["weight"])
        yield p + "attn.c_attn.weight", np.concatenate(
            [np.asarray(attn[name]["kernel"]).reshape(h, h).T for name in "qkv"], axis=0)
        yield p + "attn.c_attn.bias", np.concatenate(
            [np.asarray(attn[name]["bias"]).reshape(h) for name in "qkv"])
        yield p + "attn.c_proj.weight", t(np.asarray(attn["o"]["kernel"]).reshape(h, h))
        yield p + "ln_2.weight", np.asarray(layer["ln_2"]["weight"])
        yield p + "mlp.w1.weight", t(mlp["up"]["kernel"])
        yield p + "mlp.w2.weight", t(mlp["gate"]["kernel"])
        yield p + "mlp.c_proj.weight", t(mlp["down"]["kernel"])
    yield "transformer.ln_f.weight", np.asarray(params["ln_f"]["weight"])
    yield "lm_head.weight", t(params["lm_head"]["kernel"])


def hf_config_dict(config: QwenConfig, source: dict | None = None,
                   source_dtype: str | None = None) -> dict:
    """The exported config.json. With the `source` config.json an import recorded, the model
    fields come from `config` and everything else (auto_map, flash-attention switches,
    transformers_version, and the dtype flags unless the dtype changed) from `source`: an
    unchanged model exports the very same config.json."""
    ours = config.to_hf()
    if source is None:
        return ours
    merged = dict(source)
    model_fields = {f.name for f in dataclasses.fields(QwenConfig)}
    flags = ("bf16", "fp16", "fp32") if source_dtype != config.param_dtype else ()
    for key, value in ours.items():
        if (key in model_fields or key in flags) and (key not in merged or merged[key] != value):
            merged[key] = value
    return merged


def write_safetensors(out_dir, shapes: dict[str, tuple[int, ...]],
                      tensors: Iterator[tuple[str, np.ndarray]], dtype,
                      max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `tensors` as safetensors files into the existing `out_dir`: `model.safetensors`,
    or above `max_shard_bytes` the shards `model-0000k-of-0000n.safetensors` with their index
    (transformers' names). Returns the weight file names.

    `shapes` fixes the names, their order and the shard boundaries before anything is read;
    `tensors` must yield exactly those (name, array) pairs in that order. Each array is cast to
    `dtype` as it is written, so the writer holds one tensor at a time whatever the layout."""
    out_dir = pathlib.Path(out_dir)
    dtype = np.dtype(dtype)
    code = {name: c for c, name in _ST_CODES.items()}[dtype.name]
    sizes = {name: int(np.prod(shape)) * dtype.itemsize for name, shape in shapes.items()}
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
    tensors = iter(tensors)
    for k, shard in enumerate(shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            header[name] = {"dtype": code, "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        with open(out_dir / names[k], "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in shard:
                got, array = next(tensors)
                assert got == name and array.shape == tuple(shapes[name]), (got, name,
                                                                             array.shape)
                f.write(np.ascontiguousarray(array, dtype).reshape(-1).view(np.uint8))
    leftover = next(tensors, None)
    assert leftover is None, f"{leftover[0]!r} is not in shapes"
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: names[shard_of[name]] for name in shapes}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_config_json(out_dir, config_json: dict) -> None:
    (pathlib.Path(out_dir) / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def write_hf(out_dir, params, config: QwenConfig, max_shard_bytes: int = 5 * 2**30,
             config_json: dict | None = None, dtype: str | None = None) -> list[str]:
    """Write original-layout safetensors (sharded with an index above `max_shard_bytes`) and
    config.json into the existing `out_dir`; returns the weight file names. The tensors are
    written in `dtype` (default: the parameters' own)."""
    np_dtype = DTYPES[dtype] if dtype else np.asarray(params["embed"]["embedding"]).dtype
    names = write_safetensors(out_dir, hf_shapes(config), hf_tensors(params, config), np_dtype,
                              max_shard_bytes)
    write_config_json(out_dir, hf_config_dict(config) if config_json is None else config_json)
    return names


# ----------------------------------------------------------------------------- sources
def resolve_source(source: str,
                   patterns=("*.json", "*.safetensors", "qwen.tiktoken")) -> pathlib.Path:
    """A local directory, or a Hugging Face repo id downloaded through huggingface_hub."""
    path = pathlib.Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{source}: expected a directory holding config.json and "
                              "safetensors weights")
    if source.count("/") != 1 or source.startswith((".", "/")) or source.endswith("/"):
        raise ConversionError(f"{source}: no such directory (and not a Hugging Face repo id)")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return pathlib.Path(snapshot_download(source, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001: the hub raises many kinds (HTTP, offline, not found)
        if offline or "offline" in str(e).lower() or "connect" in str(e).lower():
            raise ConversionError(
                f"{source}: not a local directory, and the Hugging Face Hub cannot be reached "
                f"({'HF_HUB_OFFLINE is set' if offline else 'offline'}) and it is not in the "
                "local cache; download it where the Hub is reachable and pass the directory"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConversionError(f"{source}: cannot download from the Hugging Face Hub: "
                              f"{type(e).__name__}: {first}") from None


def load_hf_config(hf_dir: pathlib.Path, dtype: str | None = None) -> QwenConfig:
    overrides = {}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        overrides = {"param_dtype": dtype, "dtype": dtype}
    try:
        return QwenConfig.from_hf(pathlib.Path(hf_dir) / "config.json", **overrides)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def read_hf_config_json(hf_dir) -> dict:
    path = pathlib.Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read ({e})") from None
