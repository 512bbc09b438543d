"""Model checkpoints on disk: an Orbax pytree of the parameters plus the model config.

    <dir>/config.json    released config.json fields + our own under "qwen_jax"
    <dir>/params/        Orbax (OCDBT) checkpoint of the parameter pytree
    <dir>/qwen.tiktoken  the vocabulary, when the source had one
    <dir>/hf_source.json the imported Hugging Face config.json and weight dtype, so that an
                         export of an unchanged model reproduces that config.json exactly

A checkpoint directory is written under a temporary sibling name and renamed into place only
when complete, so a failure never leaves a half-written checkpoint behind.

A training run's work directory reads as a checkpoint too (`locate`): WORKDIR means its latest
complete step, WORKDIR/checkpoints/<step> that step. Each step holds the Orbax items `state`
(the train state; only its `params` are read) and `config` ({"model": the model config,
"tokenizer": "bytes" or the vocabulary file name, ...}); the side files (vocabulary,
generation config, hf_source.json) sit in WORKDIR itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
# A training run: WORKDIR/checkpoints/<step>/{state,config}
RUN_CHECKPOINTS = "checkpoints"
STEP_STATE = "state"
STEP_CONFIG = "config"
BYTE_TOKENIZER = "bytes"  # the "tokenizer" of a run trained with the byte-level tokenizer


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
                    side_files_from=None, extra_files: dict[str, str] | None = None
                    ) -> pathlib.Path:
    """`hf_source`: {"config": the imported config.json, "dtype": its weights' dtype};
    `side_files_from`: a directory whose vocabulary and generation config come along;
    `extra_files`: {file name: text} written beside them (e.g. an imported adapter's record)."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_params(tmp, params, config)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        if hf_source is not None:
            (tmp / HF_SOURCE_FILE).write_text(json.dumps(hf_source, indent=2) + "\n")
    return pathlib.Path(directory)


def load_hf_source(directory) -> dict | None:
    path = locate(directory).root / HF_SOURCE_FILE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text())
        if not isinstance(source.get("config"), dict):
            raise ValueError("no 'config' object")
        return source
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid record of the imported config ({e})") from None


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a checkpoint's parts are: `root` holds config.json / the side files, `step_dir`
    is the training step whose train state holds the parameters (None: `root/params`)."""

    root: pathlib.Path
    step_dir: pathlib.Path | None = None


def latest_run_step(run_dir) -> int | None:
    """The newest complete step of a training run (Orbax renames a step into its integer
    name only once it is complete)."""
    steps = [int(p.name) for p in (pathlib.Path(run_dir) / RUN_CHECKPOINTS).iterdir()
             if p.name.isdigit() and (p / STEP_STATE).is_dir()]
    return max(steps, default=None)


def locate(directory) -> Located:
    """A parameter checkpoint, a training run's WORKDIR (its latest complete step) or one of
    its steps, WORKDIR/checkpoints/<step>."""
    d = pathlib.Path(directory).absolute()
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a qwen_jax checkpoint (no such directory)")
    if (d / CONFIG_FILE).is_file() and (d / PARAMS_DIR).is_dir():
        return Located(d)
    if (d / RUN_CHECKPOINTS).is_dir():
        step = latest_run_step(d)
        if step is None:
            raise CheckpointError(f"{d}: a training run without a complete checkpoint yet "
                                  f"(nothing in {d / RUN_CHECKPOINTS})")
        return Located(d, d / RUN_CHECKPOINTS / str(step))
    if d.name.isdigit() and d.parent.name == RUN_CHECKPOINTS and (d / STEP_STATE).is_dir():
        return Located(d.parent.parent, d)
    if (d / CONFIG_FILE).is_file():
        return Located(d)  # load_params says what is missing
    raise CheckpointError(f"{d}: not a qwen_jax checkpoint (no {CONFIG_FILE}) nor a training "
                          f"run (no {RUN_CHECKPOINTS}/)")


def step_record(step_dir) -> dict:
    """The `config` item of a training step: {"model": ..., "tokenizer": ..., "config": ...}."""
    path = pathlib.Path(step_dir) / STEP_CONFIG
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            record = checkpointer.restore(path)
        if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
            raise ValueError("no 'model' object")
        return record
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a training step's config record ({e})") from None


def load_config(directory) -> QwenConfig:
    located = locate(directory)
    if located.step_dir is not None:
        try:
            return QwenConfig.from_hf(step_record(located.step_dir)["model"])
        except ConfigError as e:
            raise CheckpointError(f"{located.step_dir / STEP_CONFIG}: {e}") from None
    directory = located.root
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
    located = locate(directory)
    kind = _params_kind(located)
    if kind != "lm":
        raise CheckpointError(f"{directory}: a {kind!r} run (its parameters are not a language "
                              "model's: no lm_head); a reward run is the reward_model of PPO")
    params_dir = _params_dir(directory, located)
    # local: keeps this module light for the CLI
    from qwen_jax.model.transformer import abstract_params

    if stored.lora_rank:  # a LoRA run: restored on the host, merged, then placed
        return _load_lora_params(directory, located, params_dir, stored, config, shardings,
                                 as_numpy)
    abstract = abstract_params(config.replace(param_dtype=stored.param_dtype), shardings)
    if as_numpy:
        abstract = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    try:
        if located.step_dir is None:
            params = ocp.StandardCheckpointer().restore(params_dir, abstract)
        else:
            params = _restore_train_params(params_dir, abstract, as_numpy)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters: {e}") from None
    return params, config


def _restore_lora_tree(located, params_dir, stored):
    """The raw parameters of a LoRA model (base, adapters, quantised kernels) as host arrays."""
    from qwen_jax.model.transformer import abstract_params

    abstract = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                      abstract_params(stored))
    try:
        if located.step_dir is None:
            return ocp.StandardCheckpointer().restore(params_dir, abstract)
        return _restore_train_params(params_dir, abstract, True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters: {e}") from None


def load_lora_params(directory):
    """(params, config) of a LoRA model as stored, adapters unmerged: the base (its layer
    kernels quantised for Q-LoRA), the adapters and any modules_to_save, as numpy arrays;
    `config` keeps its lora fields. A checkpoint without adapters is a CheckpointError."""
    directory = pathlib.Path(directory).absolute()
    stored = load_config(directory)
    located = locate(directory)
    kind = _params_kind(located)
    if kind != "lm":
        raise CheckpointError(f"{directory}: a {kind!r} run, not a language model's LoRA run")
    if not stored.lora_rank:
        raise CheckpointError(f"{directory}: not a LoRA model (lora_rank=0): it has no "
                              "adapters (export it without --adapter for the full model)")
    params_dir = _params_dir(directory, located)
    return _restore_lora_tree(located, params_dir, stored), stored


def _load_lora_params(directory, located, params_dir, stored, config, shardings, as_numpy):
    """The parameters of a LoRA run with the adapters merged into the base (see load_params)."""
    from qwen_jax.model import lora

    params = _restore_lora_tree(located, params_dir, stored)
    params, plain = lora.merge(params, stored)
    if config is None or config.lora_rank:
        config = plain
    if shardings is not None:
        params = jax.device_put(params, shardings)
    elif not as_numpy:
        params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    return params, config


def _params_dir(directory: pathlib.Path, located) -> pathlib.Path:
    """Where the parameters of a located checkpoint are: a run step's state, or PARAMS_DIR."""
    params_dir = (located.step_dir / STEP_STATE if located.step_dir is not None
                  else directory / PARAMS_DIR)
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ (incomplete checkpoint)")
    return params_dir


def run_kind(directory) -> str:
    """What a checkpoint's parameters are: "lm", a language model (every parameter
    checkpoint; next-token, DPO and PPO runs, whose parameters are the policy), or "reward"
    (a reward run: a scalar head, no lm_head), as recorded with the run's steps."""
    return _params_kind(locate(directory))


def _params_kind(located: Located) -> str:
    if located.step_dir is None:
        return "lm"
    kind = step_record(located.step_dir).get("kind", "lm")
    return "lm" if kind in ("dpo", "ppo") else kind


def load_run_params(directory, abstract, as_numpy: bool = False):
    """The `params` of a training run's step (WORKDIR or WORKDIR/checkpoints/<step>) restored
    onto `abstract` (shape/dtype structs, with shardings), whatever model they belong to."""
    located = locate(directory)
    if located.step_dir is None:
        raise CheckpointError(f"{directory}: not a training run (no {RUN_CHECKPOINTS}/)")
    try:
        return _restore_train_params(located.step_dir / STEP_STATE, abstract, as_numpy)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{located.step_dir / STEP_STATE}: cannot restore parameters: "
                              f"{e}") from None


def _restore_train_params(state_dir: pathlib.Path, abstract, as_numpy: bool):
    """Only the `params` of a train state (no optimizer moments are read)."""
    if as_numpy:
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda s: s if s.sharding is not None
            else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args},
            partial_restore=True))
    return restored["params"]


def _shape_fields(config: QwenConfig) -> dict:
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
            "kv_channels", "vocab_size")
    return {k: getattr(config, k) for k in keys}


def tokenizer_path(directory) -> pathlib.Path | None:
    path = locate(directory).root / TOKENIZER_FILE
    return path if path.is_file() else None


def side_files_dir(directory) -> pathlib.Path:
    """Where the vocabulary, generation config and hf_source.json of a checkpoint sit."""
    return locate(directory).root


def load_checkpoint_tokenizer(directory):
    """The tokenizer a checkpoint was made with: a run trained with the byte-level tokenizer
    gets it back whatever vocabulary the machine has; otherwise its qwen.tiktoken (or, as
    `load_tokenizer`, $QWEN_TIKTOKEN, then the byte-level fallback)."""
    from qwen_jax.data.tokenizer import ByteTokenizer, load_tokenizer

    located = locate(directory)
    if located.step_dir is not None:
        if step_record(located.step_dir).get("tokenizer") == BYTE_TOKENIZER:
            return ByteTokenizer()
    return load_tokenizer(located.root)
