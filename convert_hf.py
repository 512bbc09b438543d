"""Convert released Hugging Face Qwen v1 checkpoints to qwen_jax checkpoints and back, and check
a conversion against a PyTorch reference.

    python convert_hf.py import <hf_dir_or_repo_id> <checkpoint_dir> [--dtype bfloat16|float32]
                                [--overwrite]
    python convert_hf.py export <checkpoint_dir> <hf_dir> [--max-shard-size 5GB] [--dtype ...]
                                [--overwrite]
    python convert_hf.py check <hf_dir_or_repo_id> <checkpoint_dir> [--length 512] [--batch 1]
                               [--seed 0] [--atol 1e-3] [--trust-remote-code]

User errors (bad paths, bad or mismatched weights, bad flags) print one `error: ...` line on
stderr and exit with status 1 (2 for bad command-line usage), leaving no output behind.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class UserError(Exception):
    """Raised for bad command-line values; reported like the library's errors."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_size(text: str) -> int:
    """'5GB' (decimal, as transformers uses) / '500MiB' / '123' bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected e.g. 5GB, 500MB, 2GiB")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; must be positive")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected a positive integer")
    return value


def cmd_import(args) -> int:
    from qwen_jax.io import checkpoint, convert

    target = pathlib.Path(args.checkpoint_dir)
    if target.exists() and not args.overwrite and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not empty (choose another directory "
                        "or pass --overwrite)")
    hf_dir = convert.resolve_source(args.source)
    config = convert.load_hf_config(hf_dir)
    source_config = convert.read_hf_config_json(hf_dir)
    stored = convert.HFCheckpoint(hf_dir).stored_dtype()
    dtype = args.dtype or stored
    config = config.replace(param_dtype=dtype, dtype=dtype)
    params = convert.load_hf_params(hf_dir, config)
    checkpoint.save_checkpoint(target, params, config, overwrite=args.overwrite,
                               hf_source={"config": source_config, "dtype": stored},
                               side_files_from=hf_dir)
    extras = [n for n in checkpoint.SIDE_FILES if (hf_dir / n).is_file()]
    print(f"imported {hf_dir} -> {target}: {config.num_params():,} parameters, {dtype}"
          f"{' (as stored)' if dtype == stored else f' (stored as {stored})'}"
          f"{', with ' + ', '.join(extras) if extras else ''}")
    return 0


def cmd_export(args) -> int:
    import jax

    from qwen_jax.io import checkpoint, convert

    target = pathlib.Path(args.hf_dir)
    if target.exists() and not args.overwrite and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not empty (choose another directory "
                        "or pass --overwrite)")
    params, config = checkpoint.load_params(args.checkpoint_dir, as_numpy=True)
    if args.dtype:
        np_dtype = convert.DTYPES[args.dtype]
        params = jax.tree.map(lambda x: x.astype(np_dtype, copy=False), params)
        config = config.replace(param_dtype=args.dtype)
    source = checkpoint.load_hf_source(args.checkpoint_dir) or {}
    config_json = convert.hf_config_dict(config, source.get("config"), source.get("dtype"))
    with checkpoint.atomic_directory(target, overwrite=args.overwrite) as tmp:
        names = convert.write_hf(tmp, params, config, args.max_shard_size, config_json)
        extras = checkpoint.copy_side_files(checkpoint.side_files_dir(args.checkpoint_dir),
                                            tmp)
    print(f"exported {args.checkpoint_dir} -> {target}: {len(names)} safetensors file(s), "
          f"{config.param_dtype}{', with ' + ', '.join(extras) if extras else ''}")
    return 0


def cmd_check(args) -> int:
    from qwen_jax.io import hf_reference

    result = hf_reference.run_check(args.hf_dir, args.checkpoint_dir, length=args.length,
                                    batch=args.batch, seed=args.seed,
                                    trust_remote_code=args.trust_remote_code)
    for line in result["notes"]:
        print(line)
    print(f"max_abs_logit_diff {result['max_abs_diff']:.3e}")
    print(f"mean_kl_ref_ours {result['mean_kl']:.3e}")
    print(f"top1_agreement {result['top1_agreement']:.6f}")
    if not result["max_abs_diff"] <= args.atol:
        raise UserError(f"max abs logit diff {result['max_abs_diff']:.3e} exceeds --atol "
                        f"{args.atol:g}: {args.checkpoint_dir} does not match {args.hf_dir}")
    print(f"ok: max abs logit diff within --atol {args.atol:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convert_hf.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    dtypes = ["bfloat16", "float32", "float16"]

    p = sub.add_parser("import", help="Hugging Face Qwen v1 weights -> qwen_jax checkpoint")
    p.add_argument("source", help="directory with config.json + safetensors, or a Hub repo id")
    p.add_argument("checkpoint_dir")
    p.add_argument("--dtype", choices=dtypes,
                   help="parameter dtype (default: the dtype the weights are stored in)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("export", help="qwen_jax checkpoint -> Hugging Face Qwen v1 layout")
    p.add_argument("checkpoint_dir")
    p.add_argument("hf_dir")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest safetensors file before sharding with an index (default 5GB)")
    p.add_argument("--dtype", choices=dtypes, help="cast the weights (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("check", help="compare our logits with a PyTorch reference")
    p.add_argument("hf_dir", help="the Hugging Face checkpoint (directory or repo id)")
    p.add_argument("checkpoint_dir", help="the qwen_jax checkpoint converted from it")
    p.add_argument("--length", type=_positive, default=512, help="tokens per row (default 512)")
    p.add_argument("--batch", type=_positive, default=1, help="rows (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input tokens")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="largest allowed max abs logit difference (default 1e-3)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="reference = the checkpoint's own modeling code (runs code from "
                        "hf_dir) instead of transformers' Qwen2ForCausalLM")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from qwen_jax.io.checkpoint import CheckpointError
    from qwen_jax.io.convert import ConversionError
    from qwen_jax.model.config import ConfigError

    try:
        return args.run(args)
    except (UserError, ConversionError, CheckpointError, ConfigError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the path is what the user needs to see
        where = f"{e.filename}: " if e.filename else ""
        print("error: " + where + " ".join(str(e.strerror or e).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
