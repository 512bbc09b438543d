"""Throughput of the pretraining data pipeline (tokenise + pack + batch) on the stdlib corpus.

    python bench/data_pipeline.py [--tiktoken PATH] [--seq-len 2048] [--batch-size 8]
                                  [--workers 2] [--batches 1000]

Reports target tokens per second after a warm-up (worker start-up is excluded).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_jax.data.pipeline import DataConfig, make_pretrain_iterator  # noqa: E402
from qwen_jax.data.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiktoken", default=str(ROOT.parent / "shared/reference/qwen.tiktoken"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    tokenizer = load_tokenizer(args.tiktoken)
    config = DataConfig(source="stdlib", seq_len=args.seq_len, batch_size=args.batch_size,
                        num_workers=args.workers, read_threads=args.read_threads, seed=0,
                        shard_index=0, shard_count=1)
    print(f"tokenizer: {type(tokenizer).__name__}, {pathlib.Path(args.tiktoken).name}, "
          f"{tokenizer.vocab_size} ids")
    print(f"settings: source=stdlib seq_len={args.seq_len} batch={args.batch_size} "
          f"workers={args.workers} read_threads={args.read_threads} batches={args.batches}")
    it = make_pretrain_iterator(config, tokenizer)
    try:
        for _ in range(args.warmup):
            next(it)
        tokens, start = 0, time.perf_counter()
        for _ in range(args.batches):
            tokens += int(next(it)["loss_mask"].sum())
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    print(f"result: {tokens} target tokens in {elapsed:.2f} s = {tokens / elapsed:,.0f} tokens/s "
          f"({args.batches / elapsed:.1f} batches/s)")
    print(f"stats: {it.stats}")


if __name__ == "__main__":
    main()
