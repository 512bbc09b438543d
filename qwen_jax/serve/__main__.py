"""python -m qwen_jax.serve: an OpenAI-compatible server for a checkpoint.

    python -m qwen_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch N]
        [--max-seq-len L] [--max-queue Q] [--api-key KEY] [--request-timeout S]
        [--shutdown-grace S] [--model-name NAME] [--generation-config FILE] [--dtype ...]
        [--kv-cache {bf16,int8}] [--prefill-chunk N] [--log-level LEVEL]

Continuous batching: --max-batch slots decode together; a new request takes a free slot
between steps and its prompt is read --prefill-chunk tokens per step while the others decode.

The model loads before the port opens (a bad checkpoint is one `error:` line, exit 1); the
port then answers while the warm-up compiles (GET /health is 503 until it is done). SIGTERM or
Ctrl-C: no new connections, the requests in flight get up to --shutdown-grace seconds, the rest
are cancelled, exit 0.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys

from qwen_jax.cli import CLIError, Parser, add_kv_cache_arg, add_model_args, load_model, run_cli
from qwen_jax.infer.sampling import GenerationError, load_generation_config
from qwen_jax.io.checkpoint import side_files_dir

PROG = "python -m qwen_jax.serve"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Serve a checkpoint over an OpenAI-compatible HTTP API.")
    add_model_args(p)
    add_kv_cache_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="slots: rows (choices) decoded together at most (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens read per engine step (>= 64; default 512); a longer "
                   "prompt joins over several steps while the running requests decode")
    p.add_argument("--max-seq-len", type=int,
                   help="context: prompt + completion tokens (default: the model's seq_length)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the engine; more get 429 (default 64)")
    p.add_argument("--api-key", default=os.environ.get("QWEN_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: "
                   "$QWEN_JAX_API_KEY, else none)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included (default 600)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the requests in flight get at SIGTERM (default 30)")
    p.add_argument("--model-name", help="the model id of /v1/models (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--generation-config", help="generation_config.json for the defaults "
                   "(default: the checkpoint's, else Qwen's base defaults)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port}: expected 0..65535")
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.prefill_chunk < 64:
        raise CLIError(f"--prefill-chunk {args.prefill_chunk}: expected >= 64")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise CLIError(f"--max-seq-len {args.max_seq_len}: expected >= 2")
    if not args.request_timeout > 0:
        raise CLIError(f"--request-timeout {args.request_timeout}: expected > 0")
    if args.shutdown_grace < 0:
        raise CLIError(f"--shutdown-grace {args.shutdown_grace}: expected >= 0")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    log = logging.getLogger("qwen_jax.serve")  # the engine's log, beside uvicorn's
    log.setLevel(args.log_level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    if args.generation_config and not pathlib.Path(args.generation_config).is_file():
        raise CLIError(f"{args.generation_config}: no such generation config file")

    import uvicorn  # the heavy imports after the argument checks

    from qwen_jax.infer.slots import SlotDecoder
    from qwen_jax.serve.app import Service, create_app
    from qwen_jax.serve.engine import Engine
    from qwen_jax.serve.metrics import Metrics

    params, config, tokenizer = load_model(args)
    gen = load_generation_config(side_files_dir(args.checkpoint), tokenizer,
                                 args.generation_config).replace(vocab_limit=tokenizer.vocab_size)
    max_seq_len = args.max_seq_len or config.seq_length

    decoder = SlotDecoder(params, config, slots=args.max_batch, max_seq_len=max_seq_len,
                          vocab_limit=tokenizer.vocab_size, kv_cache=args.kv_cache,
                          prefill_chunk=args.prefill_chunk)
    metrics = Metrics()
    engine = Engine(decoder, tokenizer, max_queue=args.max_queue, max_seq_len=max_seq_len,
                    metrics=metrics)
    name = args.model_name or pathlib.Path(args.checkpoint).resolve().name
    service = Service(engine, tokenizer, gen, model_name=name, max_seq_len=max_seq_len,
                      api_key=args.api_key, request_timeout=args.request_timeout,
                      metrics=metrics)
    engine.warmup = service.warmup_requests()
    server = uvicorn.Server(uvicorn.Config(
        create_app(service), host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_grace, lifespan="on"))

    def fatal(message):  # the engine died (e.g. the warm-up failed): stop serving
        server.should_exit = True

    engine.on_fatal = fatal
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"context {max_seq_len}, queue {args.max_queue}); warming up", file=sys.stderr)
    # uvicorn re-raises the signal that stopped it once it has shut down; with this handler in
    # place beforehand, a SIGTERM ends the process with status 0 instead of being killed.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind or start
        if e.code:
            raise CLIError(f"could not serve on {args.host}:{args.port} (see the log above)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if engine.failed:
        raise CLIError(f"the engine stopped: {engine.failed}")
    if engine.thread.is_alive():  # still inside a compile or step: do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv=None) -> int:
    try:
        return run_cli(_main, argv, errors=(GenerationError,))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
