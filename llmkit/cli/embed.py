"""`llmkit embed --model M --text T [--text T ...] [--json]`: sentence embeddings from a BERT encoder
(mean pooling + L2 normalisation, the path RAG and the server use: llmkit/rag/embeddings.py)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of texts from a BERT encoder (e.g. minilm-l6-v2)")
    p.add_argument("--model", default="minilm-l6-v2", help="registry encoder or BERT folder (default minilm-l6-v2)")
    p.add_argument("--text", action="append", required=True, help="a text to embed (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, dim, embeddings)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import resolve_encoder
    from ..rag.embeddings import Embedder

    emb = Embedder(resolve_encoder(args.model))
    vecs = emb.embed(args.text)  # (N, C), unit rows
    if args.json:
        print(json.dumps({"model": args.model, "identity": emb.identity, "dim": emb.dim,
                          "embeddings": [[round(float(x), 7) for x in v] for v in vecs]}))
    else:
        for v in vecs:
            print(" ".join(f"{x:.6f}" for x in v))
    return 0
