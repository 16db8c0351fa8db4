"""`llmkit serve`: an OpenAI- and ollama-compatible server with continuous batching (llmkit.serve).

    llmkit serve --model M [--adapter A] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N]
                 [--max-queue Q] [--cors ORIGIN] [--insecure]

SIGTERM (or Ctrl-C) stops taking requests, lets the running ones finish, then exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..devices import add_device_arg
from ..errors import LLMKitError


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI/ollama-compatible HTTP server with continuous batching and a web chat")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="adapter directory applied on top of the model")
    p.add_argument("--quant", choices=["int8", "int4", "nf4"], help="quantize the weights on the fly (int4: the "
                   "group-32 layout of a GGUF Q4_0/Q4_1 file)")
    p.add_argument("--dense-copy", action=argparse.BooleanOptionalAction, default=True,
                   help="with quantized weights: keep a bf16 copy of each for forwards of more than a few rows "
                   "(prefill, batched decode; +2 bytes a weight). Measured on SmolLM2's linears at 16 rows: "
                   "the bf16 copy ~2.3x faster than the int4 kernel (BENCHMARKS.md, Serving). Default on")
    p.add_argument("--name", help="the model name clients see (default: the --model value)")
    p.add_argument("--embedding-model", metavar="ENCODER",
                   help="serve POST /v1/embeddings with this sentence encoder (e.g. minilm-l6-v2, or its folder)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLMKIT_API_KEY"),
                   help="require Authorization: Bearer KEY on every route but /health (default: $LLMKIT_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: none)")
    g = p.add_argument_group("engine and limits")
    g.add_argument("--max-batch", type=int, default=16, help="rows of the KV-cache pool: requests decoded together")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before HTTP 429")
    g.add_argument("--max-len", type=int, default=2048, help="tokens per row: prompt + output (capped by the model)")
    g.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: --max-len - 1)")
    g.add_argument("--max-output-tokens", type=int, default=2048, help="largest max_tokens accepted")
    g.add_argument("--max-n", type=int, default=8, help="largest n (samples per request) accepted")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per scheduler step, interleaved with the others' decoding")
    g.add_argument("--prefix-cache", type=int, default=0, metavar="N",
                   help="keep the K/V of the last N prompts to reuse shared prefixes (0 = off)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_device_arg(p)
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    try:
        import uvicorn

        from ..serve.api import Limits, create_app
    except ImportError as e:
        raise LLMKitError(f"llmkit serve needs the serve extra: pip install 'llmkit[serve]' ({e.name} is missing)")
    from ..serve import Engine
    from .generate import load

    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        raise LLMKitError(f"--host {args.host} is reachable from other machines: give --api-key KEY, or --insecure "
                          "to serve without one")
    for name in ("max_batch", "max_len", "max_output_tokens", "max_n", "max_body_bytes", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise LLMKitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0 or args.prefix_cache < 0:
        raise LLMKitError("--max-queue and --prefix-cache must be >= 0")
    if not 0 < args.port < 65536:
        raise LLMKitError(f"--port must be in 1..65535, got {args.port}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load(args.model, args)
    from ..quant import keep_dense_copy

    keep_dense_copy(model, args.dense_copy)  # no-op for unquantized weights
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache, detok=tok.decode)
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                    max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    embedder = None
    if args.embedding_model:
        from ..serve.api import text_embedder

        embedder = text_embedder(args.embedding_model)
    app = create_app(engine, tok, model_name=args.name or args.model, api_key=args.api_key, cors=args.cors,
                     limits=limits, embedder=embedder)
    print(f"llmkit serve: {args.name or args.model} at http://{args.host}:{args.port}/ "
          f"(batch {args.max_batch}, context {engine.max_len}{', API key required' if args.api_key else ''})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    return 0
