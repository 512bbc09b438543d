"""Convert released Hugging Face Qwen v1 checkpoints to qwen_jax checkpoints and back, and check
a conversion against a PyTorch reference.

    python convert_hf.py import <hf_dir_or_repo_id> <checkpoint_dir> [--dtype bfloat16|float32]
                                [--overwrite]
    python convert_hf.py export <checkpoint_dir> <hf_dir> [--format qwen|qwen2]
                                [--max-shard-size 5GB] [--dtype ...] [--tiktoken PATH]
                                [--adapter] [--overwrite]
    python convert_hf.py import-adapter <peft_dir> <base_checkpoint> <checkpoint_dir>
                                        [--overwrite]
    python convert_hf.py check <hf_dir_or_repo_id> <checkpoint_dir> [--length 512] [--batch 1]
                               [--seed 0] [--atol 1e-3] [--trust-remote-code]
    python convert_hf.py tokenizer <qwen.tiktoken> <out_dir> [--model-max-length 8192]
                                   [--overwrite]

`export --format qwen` (the default) writes the original Qwen v1 layout, which runs with the
checkpoint's own modeling code; `--format qwen2` writes transformers' native Qwen2 layout
(`AutoModelForCausalLM` without remote code, or `Qwen2ForSequenceClassification` for a reward
model) with the tokenizer as `tokenizer.json`. `tokenizer` writes that tokenizer alone.

`export --adapter` writes a LoRA run's adapters (not the merged model) as a PEFT LoRA adapter,
adapter_config.json + adapter_model.safetensors, with the module names of `--format`;
`import-adapter` puts a PEFT LoRA adapter (either layout) onto a base checkpoint and saves a
LoRA checkpoint, which loads merged and exports back to the same adapter tensors
(qwen_jax/io/peft.py).

User errors (bad paths, bad or mismatched weights, bad flags) print one `error: ...` line on
stderr and exit with status 1 (2 for bad command-line usage), leaving no output behind.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
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


def _check_target(target: pathlib.Path, overwrite: bool) -> None:
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not empty (choose another directory "
                        "or pass --overwrite)")


def cmd_import(args) -> int:
    from qwen_jax.io import checkpoint, convert

    target = pathlib.Path(args.checkpoint_dir)
    _check_target(target, args.overwrite)
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
    from qwen_jax.io import checkpoint, convert

    target = pathlib.Path(args.hf_dir)
    _check_target(target, args.overwrite)
    if args.adapter:
        return export_adapter(args, target)
    if args.format == "qwen2":
        return export_qwen2(args, target)
    if args.tiktoken:
        raise UserError("--tiktoken is for --format qwen2 (the qwen format copies the "
                        "checkpoint's qwen.tiktoken as it is)")
    params, config = checkpoint.load_params(args.checkpoint_dir, as_numpy=True)
    if args.dtype:
        config = config.replace(param_dtype=args.dtype)
    source = checkpoint.load_hf_source(args.checkpoint_dir) or {}
    config_json = convert.hf_config_dict(config, source.get("config"), source.get("dtype"))
    with checkpoint.atomic_directory(target, overwrite=args.overwrite) as tmp:
        names = convert.write_hf(tmp, params, config, args.max_shard_size, config_json,
                                 dtype=config.param_dtype)
        extras = checkpoint.copy_side_files(checkpoint.side_files_dir(args.checkpoint_dir),
                                            tmp)
    print(f"exported {args.checkpoint_dir} -> {target}: {len(names)} safetensors file(s), "
          f"{config.param_dtype}{', with ' + ', '.join(extras) if extras else ''}")
    return 0


def export_adapter(args, target: pathlib.Path) -> int:
    """`export --adapter`: the adapters of a LoRA run as a PEFT LoRA adapter."""
    from qwen_jax.io import peft

    if args.tiktoken:
        raise UserError("--tiktoken is for --format qwen2 model exports, not --adapter")
    for line in peft.export_adapter(args.checkpoint_dir, target, layout=args.format,
                                    dtype=args.dtype, overwrite=args.overwrite):
        print(line)
    return 0


def cmd_import_adapter(args) -> int:
    from qwen_jax.io import peft_import

    target = pathlib.Path(args.checkpoint_dir)
    _check_target(target, args.overwrite)
    for line in peft_import.import_adapter(args.peft_dir, args.base, target,
                                           overwrite=args.overwrite):
        print(line)
    return 0


# A reward model's padding id in the Qwen2 export: transformers reads the score at the last
# token that is not this one, and the reward data ends every sequence with <|endoftext|> or
# <|im_end|>, where ours reads it; <|extra_0|> occurs in neither.
REWARD_PAD_TOKEN = "<|extra_0|>"


def _export_tokenizer(args, byte_level: bool, config):
    """(the vocabulary file to write as tokenizer.json or None, why there is none)."""
    from qwen_jax.data.tokenizer import QWEN_NUM_RANKS, SPECIAL_TOKEN_STRINGS
    from qwen_jax.io import checkpoint

    if byte_level:
        if args.tiktoken:
            raise UserError(f"{args.checkpoint_dir}: trained with the byte-level tokenizer; "
                            "--tiktoken would give it ids it was never trained on")
        return None, ("no tokenizer files: the checkpoint was trained with the byte-level "
                      "tokenizer, which has no Hugging Face tokenizer.json")
    vocab = (pathlib.Path(args.tiktoken) if args.tiktoken
             else checkpoint.tokenizer_path(args.checkpoint_dir))
    if vocab is None:
        return None, (f"no tokenizer files: {args.checkpoint_dir} has no "
                      f"{checkpoint.TOKENIZER_FILE} (give one with --tiktoken PATH)")
    needed = QWEN_NUM_RANKS + len(SPECIAL_TOKEN_STRINGS)
    if config.vocab_size < needed:
        raise UserError(f"{vocab}: the Qwen vocabulary has {needed:,} ids but the model's "
                        f"vocab_size is {config.vocab_size:,}")
    return vocab, None


def export_qwen2(args, target: pathlib.Path) -> int:
    """`export --format qwen2`: the Qwen2 layout, config.json, the generation config and the
    tokenizer files, written into a temporary directory renamed into place."""
    from qwen_jax.data.tokenizer import QWEN_NUM_RANKS, SPECIAL_TOKEN_STRINGS, ByteTokenizer
    from qwen_jax.io import checkpoint, qwen2
    from qwen_jax.io.hf_tokenizer import write_hf_tokenizer

    source = args.checkpoint_dir
    located = checkpoint.locate(source)
    record = checkpoint.step_record(located.step_dir) if located.step_dir is not None else {}
    byte_level = record.get("tokenizer") == checkpoint.BYTE_TOKENIZER
    kind = checkpoint.run_kind(source)
    config = checkpoint.load_config(source)
    pad_token_id = pad_token = None
    if kind == "reward":
        from qwen_jax.align.models import abstract_scalar_params

        params = checkpoint.load_run_params(source, abstract_scalar_params(config),
                                            as_numpy=True)
        first_special = ByteTokenizer().eod_id if byte_level else QWEN_NUM_RANKS
        pad_token = REWARD_PAD_TOKEN
        pad_token_id = first_special + SPECIAL_TOKEN_STRINGS.index(pad_token)
        if pad_token_id >= config.vocab_size:
            raise UserError(f"{source}: vocab_size {config.vocab_size} has no room for the "
                            f"padding token {pad_token} (id {pad_token_id})")
    elif kind == "lm":
        params, config = checkpoint.load_params(source, as_numpy=True)
    else:
        raise UserError(f"{source}: a {kind!r} run; --format qwen2 exports language models and "
                        "reward models")
    dtype = args.dtype or config.param_dtype
    config = config.replace(param_dtype=dtype)
    try:
        qwen2.qwen2_config(config)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    vocab, no_tokenizer = _export_tokenizer(args, byte_level, config)
    side = checkpoint.side_files_dir(source) / checkpoint.GENERATION_CONFIG_FILE
    with checkpoint.atomic_directory(target, overwrite=args.overwrite) as tmp:
        extras = []
        if vocab is not None:  # first: a bad vocabulary file fails before the weights are written
            extras += write_hf_tokenizer(vocab, tmp, model_max_length=config.seq_length,
                                         **({"pad_token": pad_token} if pad_token else {}))
        if side.is_file() and kind == "lm":
            shutil.copyfile(side, tmp / side.name)
            extras.append(side.name)
        names = qwen2.write_qwen2(tmp, params, config, args.max_shard_size,
                                  pad_token_id=pad_token_id)
    arch = qwen2.ARCH_SCORE if kind == "reward" else qwen2.ARCH_LM
    print(f"exported {source} -> {target}: Qwen2 layout ({arch}), {len(names)} safetensors "
          f"file(s), {dtype}{', with ' + ', '.join(extras) if extras else ''}")
    if pad_token_id is not None:
        print(f"note: pad_token_id {pad_token_id} ({pad_token}): pad with it, not with "
              "<|endoftext|>, so that transformers reads the score at the last real token")
    if no_tokenizer:
        print(f"note: {no_tokenizer}")
    windows = any(config.window_sizes or ())
    print(f"note: dynamic NTK and LogN attention{' and the per-layer windows' if windows else ''}"
          f" (Qwen v1's inference extras past the trained length, seq_length="
          f"{config.seq_length}) are not part of the Qwen2 layout: the export is exact within "
          f"{config.seq_length} tokens")
    return 0


def cmd_tokenizer(args) -> int:
    from qwen_jax.io.hf_tokenizer import CONFIG_FILE, TOKENIZER_FILE, write_hf_tokenizer

    target = pathlib.Path(args.out_dir)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a directory")
    present = [n for n in (TOKENIZER_FILE, CONFIG_FILE) if (target / n).exists()]
    if present and not args.overwrite:
        raise UserError(f"{target}: already has {', '.join(present)} (pass --overwrite to "
                        "replace)")
    names = write_hf_tokenizer(args.tiktoken, target, model_max_length=args.model_max_length)
    print(f"wrote {', '.join(names)} for {args.tiktoken} -> {target}")
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

    p = sub.add_parser("export", help="qwen_jax checkpoint -> Hugging Face safetensors")
    p.add_argument("checkpoint_dir")
    p.add_argument("hf_dir")
    p.add_argument("--format", choices=["qwen", "qwen2"], default="qwen",
                   help="qwen: the original Qwen v1 layout (default); qwen2: transformers' "
                        "native Qwen2 layout with tokenizer.json, loaded without remote code")
    p.add_argument("--tiktoken", help="qwen2 format: the vocabulary for tokenizer.json "
                                      "(default: the checkpoint's qwen.tiktoken)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                   help="largest safetensors file before sharding with an index (default 5GB)")
    p.add_argument("--dtype", choices=dtypes, help="cast the weights (default: as stored)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: write its adapters as a PEFT LoRA adapter "
                        "(adapter_config.json + adapter_model.safetensors) in --format's "
                        "module names instead of the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import-adapter", help="PEFT LoRA adapter + base checkpoint -> qwen_jax "
                                              "LoRA checkpoint")
    p.add_argument("peft_dir", help="the adapter: adapter_config.json + "
                                    "adapter_model.safetensors (Qwen v1 or Qwen2 names)")
    p.add_argument("base", help="the base model: a qwen_jax checkpoint or training run")
    p.add_argument("checkpoint_dir", help="the LoRA checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(run=cmd_import_adapter)

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

    p = sub.add_parser("tokenizer", help="qwen.tiktoken -> tokenizer.json + "
                                         "tokenizer_config.json")
    p.add_argument("tiktoken", help="the Qwen vocabulary file (qwen.tiktoken)")
    p.add_argument("out_dir", help="directory for the two files (created if missing)")
    p.add_argument("--model-max-length", type=_positive, default=8192,
                   help="tokenizer_config.json's model_max_length (default 8192)")
    p.add_argument("--overwrite", action="store_true", help="replace existing tokenizer files")
    p.set_defaults(run=cmd_tokenizer)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from qwen_jax.data.tokenizer import TokenizerFileError
    from qwen_jax.io.checkpoint import CheckpointError
    from qwen_jax.io.convert import ConversionError
    from qwen_jax.model.config import ConfigError

    try:
        return args.run(args)
    except (UserError, ConversionError, CheckpointError, ConfigError, TokenizerFileError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the path is what the user needs to see
        where = f"{e.filename}: " if e.filename else ""
        print("error: " + where + " ".join(str(e.strerror or e).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
