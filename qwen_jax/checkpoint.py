"""Model checkpoints on disk: an Orbax pytree of the parameters plus the model config.

    <dir>/config.json    released config.json fields + our own under "qwen_jax"
    <dir>/params/        Orbax (OCDBT) checkpoint of the parameter pytree
    <dir>/qwen.tiktoken  the vocabulary, when the source had one

A checkpoint directory is written under a temporary sibling name and renamed into place only
when complete, so a failure never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.config import ConfigError, QwenConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "qwen.tiktoken"


class CheckpointError(ValueError):
    """A checkpoint a user gave is missing, incomplete or does not fit."""


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `final`; rename it to `final` only on success."""
    final = pathlib.Path(final).absolute()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{final}: already exists and is not empty "
                                  "(choose another directory or pass --overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_params(directory: pathlib.Path, params, config: QwenConfig) -> None:
    """Write config.json and the params pytree into an existing (temporary) directory."""
    directory = pathlib.Path(directory).absolute()
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()


def save_checkpoint(directory, params, config: QwenConfig, tokenizer_file=None,
                    overwrite: bool = False) -> pathlib.Path:
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_params(tmp, params, config)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    return pathlib.Path(directory)


def load_config(directory) -> QwenConfig:
    directory = pathlib.Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a qwen_jax checkpoint (no {CONFIG_FILE})")
    try:
        return QwenConfig.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def abstract_params(config: QwenConfig, shardings=None):
    """Shape/dtype structs of the parameters of `config` (optionally with shardings)."""
    from qwen_jax.model import init_params  # local: keeps this module light for the CLI

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    if shardings is None:
        return shapes
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def load_params(directory, config: QwenConfig | None = None, shardings=None, as_numpy=False):
    """Restore (params, config). With `shardings` (a pytree of jax.sharding.Sharding) the
    arrays are restored directly onto them, resharding as needed; `as_numpy` gives host arrays.
    A `config` given by the caller must describe the same model as the checkpoint's."""
    directory = pathlib.Path(directory).absolute()
    stored = load_config(directory)
    if config is not None and _shape_fields(config) != _shape_fields(stored):
        raise CheckpointError(
            f"{directory}: checkpoint is for a different model config: stored "
            f"{_shape_fields(stored)} vs requested {_shape_fields(config)}")
    config = config or stored
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ (incomplete checkpoint)")
    abstract = abstract_params(config.replace(param_dtype=stored.param_dtype), shardings)
    if as_numpy:
        abstract = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, abstract)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters: {e}") from None
    return params, config


def _shape_fields(config: QwenConfig) -> dict:
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
            "kv_channels", "vocab_size")
    return {k: getattr(config, k) for k in keys}


def tokenizer_path(directory) -> pathlib.Path | None:
    path = pathlib.Path(directory) / TOKENIZER_FILE
    return path if path.is_file() else None


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
