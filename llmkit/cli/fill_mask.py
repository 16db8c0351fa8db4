"""`llmkit fill-mask --model M --text "Paris is the [MASK] of France." [--top-k 5] [--json]`: the most
likely tokens for each [MASK] with their probabilities, from a BERT masked-LM (llmkit/inference/fill_mask.py)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("fill-mask", help="predict the [MASK] tokens of a text with a BERT masked-LM encoder")
    p.add_argument("--model", required=True, help="a BertForMaskedLM folder or an `llmkit pretrain objective=mlm` "
                   "output (its final/ folder)")
    p.add_argument("--text", required=True, help='text with one or more [MASK], e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inference.fill_mask import fill_mask
    from ..loading import load_encoder

    model, tok = load_encoder(args.model)
    res = fill_mask(model, tok, args.text, args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "masks": res}))
        return 0
    for i, cands in enumerate(res):
        print(f"[MASK] {i + 1}: " + "  ".join(f"{c['token']!r} {c['prob']:.4f}" for c in cands))
    return 0
