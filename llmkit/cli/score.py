"""`llmkit score`: per-token log-probabilities, NLL, perplexity and bits per byte of a text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..devices import add_device_arg
from ..errors import LLMKitError


def register(sub) -> None:
    p = sub.add_parser("score", help="score a text: per-token log-probs, NLL, perplexity, bits per byte")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="PEFT/llmkit adapter directory applied on top of the model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to score")
    src.add_argument("--file", help="a UTF-8 text file to score ('-' for stdin)")
    p.add_argument("--stride", type=int, help="sliding-window stride for texts longer than the context "
                   "(default: half the context)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_device_arg(p)
    p.set_defaults(func=run)


def read_text(args) -> str:
    if args.text is not None:
        return args.text
    from ..text import decode

    if args.file == "-":
        return decode(sys.stdin.buffer.read(), "stdin")
    p = Path(args.file)
    if not p.is_file():
        raise LLMKitError(f"file not found: {p}")
    return decode(p.read_bytes(), str(p))  # invalid UTF-8 -> U+FFFD with a warning naming the line


def run(args) -> int:
    from ..devices import resolve_device
    from . import load_model
    from ..scoring import score_text

    text = read_text(args)
    if not text.strip():
        raise LLMKitError("empty text: nothing to score")
    model, tok = load_model(args.model, adapter=args.adapter, device=resolve_device(args.device))
    if tok is None:
        raise LLMKitError(f"{args.model} has no tokenizer (tokenizer.json) to encode the text with")
    res = score_text(model, tok, text, stride=args.stride, progress=not args.json and len(text) > 20000)
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    n = len(res.logprobs)
    print(f"tokens          {len(res.tokens)} ({n} scored)")
    print(f"nll             {res.nll:.4f} nats ({res.nll / n:.4f} per token)")
    print(f"perplexity      {res.perplexity:.4f}")
    print(f"bits per byte   {res.bits_per_byte:.4f}")
    if n <= 64:
        for tid, lp in zip(res.tokens[1:], res.logprobs):
            print(f"  {tok.decode([tid])!r:>20}  {lp:9.4f}")
    return 0
