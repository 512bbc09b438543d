"""Perplexity against context length, the protocol of report Table 3.

    python -m qwen_jax.eval_ppl --checkpoint DIR --data PATH --lengths 1024,2048,4096,8192
                                [--dynamic-ntk] [--logn] [--window W | W1,W2,...]
                                [--batch-size 1] [--max-windows N] [--plot out.png]
                                [--trained-length N] [--kv-cache {bf16,int8}]

Every document is cut into non-overlapping windows of each length (a remainder shorter than
the length is dropped); each window is one forward without a cache, and perplexity is
exp(mean NLL) over every predicted token of every window. Rows of the printed markdown table
add the requested techniques one at a time to the baseline (both off, no windows), in the
report's order: dynamic NTK, LogN, window attention. A length no document reaches shows "-".

--kv-cache int8 measures what the original's `use_cache_quantization` costs: that code quantises
keys and values before attention even in a forward without a cache, so each window then runs
as one prefill into an int8 cache (the window is one chunk: one scale/zero per row and head);
bf16 rounds keys and values to bf16 the same way. Without the flag no cache is used.

--data: a text file (one document), a .jsonl file ({"text": ...} per line), a directory
(each file one document), or `stdlib-validation` (the standard-library files that training on
`data.source="stdlib"` holds out). --plot needs matplotlib (pip install "matplotlib>=3.7"); it marks
the trained length (--trained-length; default: a training run's sequence length, else the
config's seq_length) with a dashed line.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.cli import CLIError, Parser, add_kv_cache_arg, add_model_args, load_model, run_cli
from qwen_jax.data.sources import document_text, list_documents
from qwen_jax.io.checkpoint import locate, step_record
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.kv_cache import init_cache
from qwen_jax.model.transformer import Qwen

LOGITS_CHUNK = 1024  # positions whose [chunk, vocab] logits exist at one time


@functools.partial(jax.jit, static_argnames=("config", "kv_cache"))
def window_nll(params, tokens, *, config: QwenConfig, kv_cache: str | None = None):
    """Sum of next-token NLLs of each window [B, L] -> [B] float32 (L - 1 predictions);
    with `kv_cache` ("int8", "bf16") the window is one prefill into such a cache."""
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))

    def nll_head(hidden, to_logits):
        # Each position's NLL [B, L, 1] instead of the [B, L, V] logits, computed chunk by
        # chunk so that long windows never hold all their logits at once.
        out = []
        for start in range(0, hidden.shape[1], LOGITS_CHUNK):
            logits = to_logits(hidden[:, start:start + LOGITS_CHUNK])
            target = targets[:, start:start + LOGITS_CHUNK, None]
            out.append(jax.nn.logsumexp(logits, axis=-1, keepdims=True)
                       - jnp.take_along_axis(logits, target, axis=-1))
        return jnp.concatenate(out, axis=1)

    cache = None if kv_cache is None else init_cache(config, *tokens.shape, kv_cache)
    nll, _ = Qwen(config).apply({"params": params}, tokens, head=nll_head, cache=cache)
    return jnp.sum(nll[:, :-1, 0], axis=1)


def perplexity(params, config: QwenConfig, windows: np.ndarray, batch_size: int,
               kv_cache: str | None = None) -> float:
    """exp(mean token NLL) over windows [n, L]; the last batch is filled up with zero weight."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        nll = window_nll(params, batch, config=config, kv_cache=kv_cache)
        total += float(np.sum(np.asarray(nll)[:real]))
    return math.exp(total / (len(windows) * (windows.shape[1] - 1)))


STDLIB_VALIDATION = "stdlib-validation"


def load_documents(path) -> list[str]:
    if str(path) == STDLIB_VALIDATION:  # held out from training on data.source="stdlib"
        index = list_documents("stdlib", split="validation")
        return [text for i in range(len(index))
                if (text := document_text(index, i, "text")[0]).strip()]
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CLIError(f"{path}, line {n}: not a JSON object with a 'text'") from None
    else:
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CLIError(f"{path}: no text to evaluate on")
    return docs


def cut_windows(documents: list[list[int]], length: int, max_windows: int | None) -> np.ndarray:
    windows = [doc[i:i + length] for doc in documents
               for i in range(0, len(doc) - length + 1, length)]
    return np.asarray(windows[:max_windows], np.int32).reshape(-1, length)


def technique_rows(config: QwenConfig, dynamic_ntk: bool, logn: bool, windows):
    """(label, config) per row: the baseline, then each requested technique added in turn."""
    rows = [("baseline", config.replace(use_dynamic_ntk=False, use_logn_attn=False,
                                        window_sizes=None))]
    steps = [("dynamic NTK", {"use_dynamic_ntk": True}, dynamic_ntk),
             ("LogN", {"use_logn_attn": True}, logn),
             ("window", {"window_sizes": windows}, windows is not None)]
    label, current = "", rows[0][1]
    for name, change, wanted in steps:
        if wanted:
            label, current = f"{label} + {name}", current.replace(**change)
            rows.append((label.strip(), current))
    return rows


def parse_ints(text: str, what: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise CLIError(f"{what} {text!r}: expected comma-separated integers >= {minimum}")
    return values


def markdown_table(lengths, results) -> str:
    lines = ["| technique | " + " | ".join(str(n) for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for label, ppls in results:
        cells = ["-" if p is None else f"{p:.2f}" for p in ppls]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpoint_name(checkpoint) -> str:
    """The name a plot gives a checkpoint: its directory name; a training run's step
    directory (WORKDIR/checkpoints/<step>) reads as "<run> step <step>"."""
    path = pathlib.Path(checkpoint).absolute().resolve()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name} step {path.name}"
    return path.name


def trained_length(checkpoint, config: QwenConfig) -> int:
    """The context a checkpoint was trained at: a training run's sequence length
    (config.data.seq_len in its record), else the model config's seq_length."""
    located = locate(checkpoint)
    if located.step_dir is not None:
        seq_len = step_record(located.step_dir).get("config", {}).get("data", {}).get("seq_len")
        if isinstance(seq_len, int) and seq_len > 0:
            return seq_len
    return config.seq_length


def _plain_number(value, _position=None) -> str:
    """A tick label without scientific notation: 20, 2.5, 1500."""
    return np.format_float_positional(float(value), precision=4, trim="-")


def make_figure(lengths, results, *, trained_length: int | None = None, title: str = ""):
    """The perplexity-vs-length figure (a matplotlib Figure, no pyplot state): one line per
    row, x ticks at exactly the evaluated lengths, plain-number perplexities, and a dashed
    vertical line at `trained_length` (None: no line)."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for label, ppls in results:
        points = [(n, p) for n, p in zip(lengths, ppls) if p is not None]
        ax.plot([n for n, _ in points], [p for _, p in points], marker="o", label=label)
    if trained_length:
        ax.axvline(trained_length, color="0.4", linestyle="--", linewidth=1,
                   label=f"trained length ({trained_length})", gid="trained-length")

    # x: lengths are usually powers of two, evenly spaced on a base-2 log axis; a tick and a
    # plain label at each evaluated length and nothing else (no minor ticks or labels).
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(list(lengths)))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(n) for n in lengths]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())

    # y: log when the perplexities span more than a factor of 5 (a blow-up past the trained
    # length), ticks at 1-2-5 steps (decades only past 3 decades), unlabelled minor ticks;
    # linear otherwise. Labels are plain numbers either way.
    values = [p for _, ppls in results for p in ppls if p is not None and p > 0]
    ratio = max(values) / min(values) if values else 1.0
    if ratio > 5:
        ax.set_yscale("log")
        subs = (1.0, 2.0, 5.0) if ratio <= 1e3 else (1.0,)
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_plain_number))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        formatter = ticker.ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        ax.yaxis.set_major_formatter(formatter)
    ax.set(xlabel="context length (tokens)", ylabel="perplexity")
    ax.set_title(f"{title}: perplexity vs context length" if title
                 else "perplexity vs context length")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save_plot(path, lengths, results, *, trained_length: int | None = None,
              title: str = ""):
    """Write `make_figure(...)` to `path` (PNG); returns the figure."""
    fig = make_figure(lengths, results, trained_length=trained_length, title=title)
    fig.savefig(path, dpi=120)
    return fig


def _main(argv=None) -> int:
    p = Parser(prog="python -m qwen_jax.eval_ppl", description=__doc__.splitlines()[0])
    add_model_args(p)
    add_kv_cache_arg(p)
    p.add_argument("--data", required=True,
                   help="text file, .jsonl file, directory, or stdlib-validation")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="window lengths")
    p.add_argument("--dynamic-ntk", action="store_true", help="add dynamic NTK interpolation")
    p.add_argument("--logn", action="store_true", help="add LogN attention scaling")
    p.add_argument("--window", help="per-layer attention windows: one size for every layer "
                   "or a comma list with one per layer (0 = full attention)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--max-windows", type=int, help="evaluate at most this many per length")
    p.add_argument("--plot", help="also save a PNG plot here (needs matplotlib)")
    p.add_argument("--trained-length", type=int,
                   help="--plot: mark this context length with a dashed line (default: a "
                   "training run's sequence length, else the config's seq_length; 0 = none)")
    args = p.parse_args(argv)
    lengths = parse_ints(args.lengths, "--lengths", 2)
    if args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        raise CLIError("--batch-size and --max-windows must be positive")
    if args.trained_length is not None and args.trained_length < 0:
        raise CLIError(f"--trained-length {args.trained_length}: expected >= 0 (0 = no line)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError('--plot needs matplotlib: pip install "matplotlib>=3.7"') from None
    documents = load_documents(args.data)
    params, config, tokenizer = load_model(args)
    windows = None
    if args.window is not None:
        sizes = parse_ints(args.window, "--window", 0)
        if len(sizes) not in (1, config.num_hidden_layers):
            raise CLIError(f"--window {args.window!r}: give one size or "
                           f"{config.num_hidden_layers} (one per layer)")
        windows = tuple(sizes * config.num_hidden_layers if len(sizes) == 1 else sizes)
    ids = [tokenizer.encode(d, allow_special=False) for d in documents]
    trained = trained_length(args.checkpoint, config)
    print(f"{len(ids)} document(s), {sum(map(len, ids)):,} tokens ({tokenizer.name}); trained "
          f"length {trained} (seq_length {config.seq_length} is the long-context techniques' "
          "base)", file=sys.stderr)
    results = []
    for label, row_config in technique_rows(config, args.dynamic_ntk, args.logn, windows):
        ppls = []
        for length in lengths:
            cut = cut_windows(ids, length, args.max_windows)
            ppls.append(perplexity(params, row_config, cut, args.batch_size, args.kv_cache)
                        if len(cut) else None)
            print(f"{label} @ {length}: {len(cut)} window(s), perplexity "
                  f"{'-' if ppls[-1] is None else f'{ppls[-1]:.3f}'}", file=sys.stderr)
        results.append((label, ppls))
    print(markdown_table(lengths, results))
    if args.plot:
        trained = trained if args.trained_length is None else args.trained_length
        save_plot(args.plot, lengths, results, trained_length=trained or None,
                  title=checkpoint_name(args.checkpoint))
        print(f"plot saved to {args.plot}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
