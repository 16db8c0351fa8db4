"""`llmkit tokenizer train`: train a byte-level BPE tokenizer on text files and save it as
tokenizer.json + tokenizer_config.json (loadable by llmkit and by transformers' AutoTokenizer)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LLMKitError
from ..tokenizer import DEFAULT_SPECIAL_TOKENS


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train byte-level BPE tokenizers",
                              description="Tokenizer tools.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files",
                       description="Train a byte-level BPE tokenizer (any UTF-8 text round-trips exactly) on "
                                   ".txt files (UTF-8), .jsonl files (a 'text' field per line) or .parquet files "
                                   "(a 'text' column); directories are searched for those. Writes DIR/tokenizer.json and "
                                   "DIR/tokenizer_config.json (bos/eos, ChatML chat template).")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files or directories")
    t.add_argument("--vocab-size", type=int, required=True, metavar="V",
                   help="target vocabulary size (at least 256 + number of special tokens)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--special-tokens", nargs="*", default=list(DEFAULT_SPECIAL_TOKENS), metavar="TOK",
                   help=f"special tokens, given the first ids (default: {' '.join(DEFAULT_SPECIAL_TOKENS)})")
    t.add_argument("--eos-token", default=None, help="end-of-sequence token (default: the first special token)")
    t.add_argument("--bos-token", default=None, help="beginning-of-sequence token (default: the eos token)")
    t.add_argument("--add-bos", action="store_true", help="prepend the bos token when encoding")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    t.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    t.set_defaults(func=run_train)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train(args) -> int:
    from ..io import atomic_dir, check_output_dir, output_lock
    from ..tokenizer import Tokenizer
    from ..train.data import list_inputs

    if not 0 < args.vocab_size <= 1 << 20:
        raise LLMKitError(f"--vocab-size must be in [1, {1 << 20:,}], got {args.vocab_size:,}")
    with output_lock(args.out):  # one writer per output directory
        files = list_inputs(args.input)
        check_output_dir(args.out, args.force, files)  # fail before the (possibly long) training
        print(f"llmkit: training a byte-level BPE tokenizer (vocab {args.vocab_size}) on {len(files)} file(s)...",
              file=sys.stderr)
        tok = Tokenizer.train(files, args.vocab_size, args.special_tokens, bos_token=args.bos_token,
                              eos_token=args.eos_token, add_bos=args.add_bos, min_frequency=args.min_frequency,
                              progress=sys.stderr.isatty())
        with atomic_dir(args.out, force=args.force, owns=("tokenizer*.json",)) as tmp:
            tok.save(tmp)
    if tok.vocab_size < args.vocab_size:
        print(f"llmkit: warning: the corpus supports only {tok.vocab_size} tokens (asked for {args.vocab_size}): "
              "BPE ran out of pairs to merge", file=sys.stderr)
    print(f"llmkit: vocab {tok.vocab_size}, eos {tok.eos_token!r}, fingerprint {tok.fingerprint()[:12]}",
          file=sys.stderr)
    print(Path(args.out))
    return 0
