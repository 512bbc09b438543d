"""Interactive ChatML chat with a checkpoint, the reply streamed as it is generated.

    python -m qwen_jax.chat --checkpoint DIR [--system TEXT] [--max-window-size N]
                            [--kv-cache {bf16,int8}] [sampling]

Each user message becomes the original Qwen `make_context` prompt: the system prompt, the
history newest-first while it fits max_window_size, the new query. On a terminal it prompts
"User:" and quits on Ctrl-D; with piped stdin every non-empty line is one user message and the
replies go to stdout one after another (a newline after each), progress to stderr.
"""

from __future__ import annotations

import sys
import time

from qwen_jax.cli import Parser, add_kv_cache_arg, add_model_args, load_model, run_cli
from qwen_jax.data import chat_format
from qwen_jax.infer.generate import (
    GenerationError,
    TextStreamer,
    add_sampling_args,
    describe_cache,
    generate,
    generation_config_from_args,
)


class Conversation:
    """The history of one chat and the prompt ids of its next turn."""

    def __init__(self, tokenizer, system: str = chat_format.DEFAULT_SYSTEM,
                 max_window_size: int = 6144):
        self.tokenizer, self.system, self.max_window_size = tokenizer, system, max_window_size
        self.history: list[tuple[str, str]] = []

    def prompt_ids(self, query: str) -> list[int]:
        return chat_format.make_context(self.tokenizer, query, self.history, self.system,
                                        self.max_window_size, "chatml")[1]

    def add(self, query: str, response: str) -> None:
        self.history.append((query, response))


def _main(argv=None) -> int:
    p = Parser(prog="python -m qwen_jax.chat", description="Chat with a Qwen checkpoint.")
    add_model_args(p)
    add_kv_cache_arg(p)
    p.add_argument("--system", default=chat_format.DEFAULT_SYSTEM, help="the system prompt")
    p.add_argument("--max-window-size", type=int,
                   help="history budget in tokens (default: the generation config's, 6144)")
    add_sampling_args(p)
    args = p.parse_args(argv)
    params, config, tokenizer = load_model(args)
    gen = generation_config_from_args(args, tokenizer)
    # Chat always ends a reply at the ChatML stop tokens, whatever the generation config.
    stops = tuple(dict.fromkeys(gen.stop_sequences + tuple(
        tuple(s) for s in chat_format.stop_words_ids(tokenizer, "chatml"))))
    window = args.max_window_size or gen.max_window_size
    gen = gen.replace(stop_sequences=stops, max_window_size=window)
    # One cache size for the whole chat, so the decode step compiles once.
    max_length = args.max_length or window + gen.max_new_tokens
    print(describe_cache(config, 1, max_length, args.kv_cache), file=sys.stderr)
    conversation = Conversation(tokenizer, args.system, window)
    interactive = sys.stdin.isatty()
    failed, turn = False, 0
    while True:
        if interactive:
            print("User: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            if interactive:
                print()
            return 1 if failed else 0
        query = line.rstrip("\n")
        if not query.strip():
            continue
        turn += 1
        if interactive:
            print("Assistant: ", end="", flush=True)
        streamer = TextStreamer(tokenizer)
        start = time.perf_counter()
        try:
            result = generate(params, config, [conversation.prompt_ids(query)], gen,
                              seed=args.seed + turn, max_length=max_length, stream=streamer,
                              kv_cache=args.kv_cache)
        except GenerationError as e:  # e.g. a message too long for the cache: skip the turn
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            failed = True
            continue
        print(flush=True)
        conversation.add(query, tokenizer.decode(result.completion(0)))
        print(f"[turn {turn}: {int(result.num_tokens[0])} tokens in "
              f"{time.perf_counter() - start:.2f} s]", file=sys.stderr)


def main(argv=None) -> int:
    try:
        return run_cli(_main, argv, errors=(GenerationError,))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
