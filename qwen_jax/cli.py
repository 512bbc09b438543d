"""What every command line shares: one-line errors, the model arguments and loading.

A CLI body raises `CLIError` (or a checkpoint, config or tokenizer error) for anything the user
can get wrong; `run_cli` turns it into one `error: ...` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

from qwen_jax.data.tokenizer import TokenizerFileError
from qwen_jax.io.checkpoint import (
    CheckpointError,
    load_checkpoint_tokenizer,
    load_config,
    load_params,
)
from qwen_jax.model.config import ConfigError
from qwen_jax.model.transformer import unstack_layers


class CLIError(Exception):
    """A bad command-line input, reported as one `error:` line and exit status 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a qwen_jax checkpoint, a training run's workdir (its latest complete "
                   "step) or WORKDIR/checkpoints/STEP")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="compute and KV-cache dtype (default: the checkpoint's)")


KV_CACHE_CHOICES = ("bf16", "int8")


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES,
                   help="KV cache storage (default: the compute dtype); int8 is the original's "
                   "use_cache_quantization: uint8 with a float32 scale and zero point per row, "
                   "head and appended chunk, about half the memory of bf16")


def _on_device(params):
    """The parameters as device arrays, leaf by leaf (a host copy is dropped as soon as its
    device copy exists): a numpy tree would be copied to the device on every call of a
    jitted step, e.g. each decoded token."""
    leaves, treedef = jax.tree.flatten(params)
    del params
    for i, leaf in enumerate(leaves):
        leaves[i] = jax.device_put(leaf)
        del leaf
    return jax.tree.unflatten(treedef, leaves)


def load_model(args):
    """(params, config, tokenizer) of --checkpoint, with --dtype applied."""
    directory = pathlib.Path(args.checkpoint)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such checkpoint directory")
    config = load_config(directory)
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    tokenizer = load_checkpoint_tokenizer(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise CLIError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the "
                       f"model only {config.vocab_size}")
    params, config = load_params(directory, config)
    if jax.default_backend() == "cpu":  # decoding on CPU runs faster per layer: see there
        params, config = unstack_layers(params, config, consume=True)
    params = _on_device(params)
    print(f"model: {config.num_params():,} parameters, {config.dtype}; tokenizer: "
          f"{tokenizer.name}", file=sys.stderr)
    return params, config, tokenizer


def run_cli(main_fn, argv=None, errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a CLI body; user errors (ours, and the caller's `errors`) become one `error:` line
    on stderr and exit status 1."""
    try:
        return main_fn(argv)
    except (CLIError, CheckpointError, ConfigError, TokenizerFileError) + tuple(errors) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print("error: " + where + " ".join(str(e.strerror or e).split()), file=sys.stderr)
        return 1
