"""`llmkit metrics NAME`: score a predictions file against one or more reference files."""

from __future__ import annotations

import json
from pathlib import Path

NAMES = ["accuracy", "f1", "exact_match", "bleu", "chrf", "rouge", "meteor", "bertscore", "perplexity"]


def register(sub) -> None:
    p = sub.add_parser("metrics", help="text metrics: accuracy, f1, exact_match, bleu, chrf, rouge, meteor, "
                       "bertscore, perplexity",
                       description="One segment a line in every file; give --references several times for "
                       "multi-reference metrics. perplexity needs --model and scores the --predictions text.")
    p.add_argument("name", metavar="NAME", help=", ".join(NAMES))
    p.add_argument("--predictions", required=True, help="predictions (or, for perplexity, the text)")
    p.add_argument("--references", action="append", default=[], help="reference file (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--stem", action="store_true", help="rouge: Porter-stem words first")
    p.add_argument("--normalize", action="store_true", help="exact_match: SQuAD answer normalisation")
    p.add_argument("--no-stem", action="store_true", help="meteor: exact matches only (no stem module)")
    p.add_argument("--encoder", default=None, help="bertscore: BERT folder (default: pulled minilm-l6-v2)")
    p.add_argument("--num-layers", type=int, default=None, help="bertscore: use this layer (default: last)")
    p.add_argument("--idf", action="store_true", help="bertscore: idf weighting from the references")
    p.add_argument("--model", default=None, help="perplexity: the language model")
    p.add_argument("--context", type=int, default=None, help="perplexity: window length (default: model's)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: window start every N tokens")
    p.add_argument("--document", action="store_true", help="perplexity: the whole file is one text")
    p.set_defaults(func=run)


def read_lines(path: str) -> list[str]:
    from ..errors import LLMKitError

    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"file not found: {p}")
    from ..text import decode

    text = decode(p.read_bytes(), str(p))  # invalid UTF-8 -> U+FFFD with a warning naming the line
    if not text:
        return []
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def run(args) -> int:
    from ..errors import LLMKitError, closest
    from ..eval.metrics import check_lengths, compute

    if args.name not in NAMES:
        raise LLMKitError(f"unknown metric {args.name!r}{closest(args.name, NAMES)}; known: {', '.join(NAMES)}")
    if args.name == "perplexity":
        if not args.model:
            raise LLMKitError("perplexity needs --model")
        import torch

        from ..eval.perplexity import perplexity
        from . import load_model

        torch.set_num_threads(2)
        p = Path(args.predictions)
        if not p.is_file():
            raise LLMKitError(f"file not found: {p}")
        texts = [p.read_text(encoding="utf-8")] if args.document else [t for t in read_lines(args.predictions) if t]
        model, tok = load_model(args.model)
        res = perplexity(model, tok, texts, args.context, args.stride, progress=True)
    else:
        if not args.references:
            raise LLMKitError(f"{args.name} needs --references FILE")
        preds = read_lines(args.predictions)
        refs = [read_lines(f) for f in args.references]
        check_lengths(preds, refs, names=args.references)
        if not preds:
            raise LLMKitError(f"{args.predictions} holds no predictions (an empty file)")
        kw = {}
        if args.name == "rouge":
            kw["use_stemmer"] = args.stem
        elif args.name == "exact_match":
            kw["normalize"] = args.normalize
        elif args.name == "meteor":
            kw["stem"] = not args.no_stem
        elif args.name == "bertscore":
            kw.update(model_dir=args.encoder, num_layers=args.num_layers, idf=args.idf)
        if len(refs) > 1 and args.name in ("accuracy", "f1"):
            raise LLMKitError(f"{args.name} takes one --references file, got {len(refs)}")
        res = compute(args.name, preds, refs, **kw)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}\t{v:.6f}" if isinstance(v, float) else f"{k}\t{v}")
    return 0
