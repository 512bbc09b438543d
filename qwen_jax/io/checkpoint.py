"""Model checkpoints on disk: an Orbax pytree of the parameters plus the model config.

    <dir>/config.json    released config.json fields + our own under "qwen_jax"
    <dir>/params/        Orbax (OCDBT) checkpoint of the parameter pytree
    <dir>/qwen.tiktoken  the vocabulary, when the source had one
    <dir>/hf_source.json the imported Hugging Face config.json and weight dtype, so that an
                         export of an unchanged model reproduces that config.json exactly

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
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen_jax.model.config import ConfigError, QwenConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "qwen.tiktoken"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files that travel with the weights through import, export and copies of a checkpoint.
SIDE_FILES = (TOKENIZER_FILE, GENERATION_CONFIG_FILE)
HF_SOURCE_FILE = "hf_source.json"


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        # Retried: a writer thread of a failed Orbax save may still be creating files in it.
        for _ in range(20):
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                break
            time.sleep(0.05)


def write_params(directory: pathlib.Path, params, config: QwenConfig) -> None:
    """Write config.json and the params pytree into an existing (temporary) directory."""
    directory = pathlib.Path(directory).absolute()
    (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    leaves = jax.tree_util.tree_leaves(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not isinstance(leaf, (np.ndarray, np.generic, jax.Array, int, float)):
            raise CheckpointError(f"params{jax.tree_util.keystr(path)}: a {type(leaf).__name__}, "
                                  "not an array")
    if leaves and all(isinstance(x, np.ndarray) for x in leaves):
        # Host arrays (an import): Orbax's default numpy handler deep-copies every array
        # (against concurrent mutation, which cannot happen here) and zstd keeps a compressed
        # copy, so its peak is ~3x the parameters; this way tensorstore writes from the arrays
        # themselves (+~5 MB). Weights hardly compress anyway.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))  # unused; Orbax warns without it
        handler = ocp.PyTreeCheckpointHandler(use_compression=False,
                                              type_handler_registry=registry)
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        return
    # Closing waits for Orbax's background writers, also when save() raises: otherwise they
    # can recreate files in the directory atomic_directory is removing.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
        checkpointer.wait_until_finished()


def copy_side_files(source_dir, target_dir) -> list[str]:
    """Copy the SIDE_FILES that exist in `source_dir`; returns their names."""
    copied = []
    for name in SIDE_FILES:
        source = pathlib.Path(source_dir) / name
        if source.is_file():
            shutil.copyfile(source, pathlib.Path(target_dir) / name)
            copied.append(name)
    return copied


def save_checkpoint(directory, params, config: QwenConfig, tokenizer_file=None,
                    overwrite: bool = False, hf_source: dict | None = None,
                    side_files_from=None) -> pathlib.Path:
    """`hf_source`: {"config": the imported config.json, "dtype": its weights' dtype};
    `side_files_from`: a directory whose vocabulary and generation config come along."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_params(tmp, params, config)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if hf_source is not None:
            (tmp / HF_SOURCE_FILE).write_text(json.dumps(hf_source, indent=2) + "\n")
    return pathlib.Path(directory)


def load_hf_source(directory) -> dict | None:
    path = pathlib.Path(directory) / HF_SOURCE_FILE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text())
        if not isinstance(source.get("config"), dict):
            raise ValueError("no 'config' object")
        return source
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid record of the imported config ({e})") from None


def load_config(directory) -> QwenConfig:
    directory = pathlib.Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a qwen_jax checkpoint (no {CONFIG_FILE})")
    try:
        return QwenConfig.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


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
    from qwen_jax.model.transformer import (
        abstract_params,  # local: keeps this module light for the CLI
    )

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
