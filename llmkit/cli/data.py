"""`llmkit data prepare`: tokenise a corpus into memory-mapped token shards with a manifest."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare pretraining data (token shards)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    q = dsub.add_parser("prepare", help="tokenise txt / jsonl / parquet files into uint16/uint32 shards")
    q.add_argument("--input", nargs="+", required=True, help="files or directories (.txt, .jsonl, .parquet)")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.json, or GGUF file")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for validation")
    q.add_argument("--val-input", nargs="+", help="files that form the validation split instead")
    q.add_argument("--text-field", default="text", help="field of jsonl / column of parquet with the text")
    q.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    q.add_argument("--force", action="store_true", help="overwrite --out")
    q.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    from ..errors import LLMKitError
    from ..io import output_lock
    from ..tokenizer import Tokenizer
    from ..train.data import prepare

    if args.shard_tokens < 1 << 16:  # smaller shards only multiply files (--shard-tokens 1: one file per token)
        raise LLMKitError(f"--shard-tokens must be at least {1 << 16:,}, got {args.shard_tokens:,}")
    tok = Tokenizer.load(args.tokenizer)
    with output_lock(args.out):  # one writer per output directory
        m = prepare(args.input, tok, args.out, val_fraction=args.val_fraction, val_inputs=args.val_input,
                    shard_tokens=args.shard_tokens, text_field=args.text_field, force=args.force)
    for split, s in m["splits"].items():
        print(f"{split:5s} {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes, "
              f"{len(s['shards'])} shard(s)")
    print(f"wrote {args.out} ({m['dtype']}, tokenizer {m['tokenizer_fingerprint'][:12]})")
    return 0
