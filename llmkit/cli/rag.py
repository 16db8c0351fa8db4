"""`llmkit rag index|search|ask|eval`: retrieval-augmented generation over a folder of documents
(llmkit/rag). --index is a SQLite file path or a postgresql:// URI (pgvector backend)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import LLMKitError


def _common(p, index_required=True) -> None:
    p.add_argument("--index", required=index_required, help="index: a .sqlite path or a postgresql:// URI")
    p.add_argument("--encoder", help="embedding model folder (default: `llmkit pull minilm-l6-v2`)")


def register(sub) -> None:
    p = sub.add_parser("rag", help="retrieval-augmented generation: index documents, search, ask, evaluate")
    rs = p.add_subparsers(dest="rag_command", metavar="ACTION", required=True)

    q = rs.add_parser("index", help="add or update a folder of .txt/.md/.html/.pdf documents in an index")
    q.add_argument("--docs", required=True, help="folder of documents (searched recursively)")
    _common(q)
    q.add_argument("--chunker", default="sentence", choices=["fixed", "recursive", "sentence"])
    q.add_argument("--chunk-size", type=int, default=200, help="tokens of the embedding model (default 200)")
    q.add_argument("--overlap", type=int, default=40, help="overlap in tokens (fixed, sentence)")
    q.add_argument("--prune", action="store_true", help="delete indexed documents no longer in the folder")
    q.add_argument("--force", action="store_true", help="rebuild the index from scratch")
    q.set_defaults(func=run_index)

    q = rs.add_parser("search", help="ranked chunks for a query")
    _common(q)
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid", "weighted"])
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("query")
    q.set_defaults(func=run_search)

    q = rs.add_parser("ask", help="answer a question from the index, citing the chunks used")
    _common(q)
    q.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid", "weighted"])
    q.add_argument("--min-score", type=float, default=0.25, help="answer \"I don't know\" below this cosine")
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--json", action="store_true")
    q.add_argument("question")
    q.set_defaults(func=run_ask)

    q = rs.add_parser("eval", help="recall@k / MRR and answer EM/F1 on SQuAD-format data")
    _common(q, index_required=False)
    q.add_argument("--data", help="SQuAD JSON (default: $LLMKIT_SHARED_DATA/rag/squad_expmrc_dev.json)")
    q.add_argument("--modes", default="bm25,dense,hybrid", help="comma-separated search modes")
    q.add_argument("--limit", type=int, help="only the first N questions")
    q.add_argument("--model", help="also measure answers: closed-book vs with retrieved context")
    q.add_argument("--answer-limit", type=int, default=100, help="questions for the answer measurement")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_eval)


def _embedder(args):
    from ..rag.embeddings import Embedder

    return Embedder(args.encoder)


def _open(args, embedder):
    from ..rag.pgvector import open_index

    return open_index(args.index, embedder)


def _is_pg(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def build_index(spec: str, docs, embedder, chunking, force: bool = False, prune: bool = False, quiet: bool = False):
    """Create (atomically: a new SQLite file appears only complete) or update an index. -> (index, counts)."""
    from ..io import atomic_path
    from ..progress import progress_bar
    from ..rag.pgvector import open_index

    bar = progress_bar(enabled=not quiet, desc="embed", unit="chunk")
    if _is_pg(spec):
        try:
            idx = open_index(spec, embedder)
        except LLMKitError as e:
            if "no llmkit index" not in str(e):
                raise
            idx = open_index(spec, embedder, chunking, create=True)
        if force:
            idx.delete(idx.doc_ids())
    elif Path(spec).exists() and not force:
        idx = open_index(spec, embedder)
    else:
        with atomic_path(spec) as tmp:
            tmp.unlink()
            with open_index(str(tmp), embedder, chunking, create=True) as new:
                counts = new.add(docs, progress=bar)
        return open_index(spec, embedder), counts
    counts = idx.add(docs, progress=bar)
    if prune:
        keep = {d.doc_id for d in docs}
        counts["deleted"] = idx.delete([i for i in idx.doc_ids() if i not in keep])
    return idx, counts


def run_index(args) -> int:
    from ..rag.index import ChunkSettings
    from ..rag.loaders import load_folder

    docs = load_folder(args.docs)
    t0 = time.perf_counter()
    idx, counts = build_index(args.index, docs, _embedder(args), ChunkSettings(args.chunker, args.chunk_size, args.overlap),
                              args.force, args.prune)
    with idx:
        st = idx.stats()
    print(f"{args.index}: {st['documents']} documents, {st['chunks']} chunks "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def run_search(args) -> int:
    with _open(args, _embedder(args)) as idx:
        hits = idx.search(args.query, args.k, args.mode)
    if args.json:
        print(json.dumps({"query": args.query, "mode": args.mode, "hits": [
            {"rank": r, "score": h.score, "source": h.source, "doc_id": h.doc_id, "chunk_id": h.chunk_id,
             "text": h.text} | h.meta for r, h in enumerate(hits, 1)]}))
        return 0
    for r, h in enumerate(hits, 1):
        print(f"[{r}] {h.score:.4f}  {h.source}\n    {' '.join(h.text.split())[:300]}")
    return 0


def run_ask(args) -> int:
    from . import load_model
    from ..rag.answer import answer

    model, tok = load_model(args.model)
    with _open(args, _embedder(args)) as idx:
        a = answer(args.question, idx, model, tok, args.k, args.mode, args.min_score, args.max_new_tokens)
    if args.json:
        print(json.dumps({"answer": a.text, "known": a.known, "cited": a.cited,
                          "sources": [{"n": i, "source": h.source, "chunk_id": h.chunk_id, "score": h.score}
                                      for i, h in enumerate(a.hits, 1)]}))
        return 0
    print(a.text)
    for i in a.cited:
        print(f"[{i}] {a.hits[i - 1].source}")
    return 0


def run_eval(args) -> int:
    import tempfile

    from ..progress import progress_bar
    from ..rag.index import ChunkSettings
    from ..rag.squad import em_f1, load_squad, retrieval_metrics

    data = args.data or str(Path(os.environ.get("LLMKIT_SHARED_DATA", "../shared/data")) / "rag" / "squad_expmrc_dev.json")
    docs, qs = load_squad(data)
    qs = qs[:args.limit] if args.limit else qs
    emb = _embedder(args)
    report = {"data": data, "documents": len(docs), "questions": len(qs), "embedder": emb.identity}
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.index or str(Path(tmp) / "squad.sqlite")
        t0 = time.perf_counter()
        idx, counts = build_index(spec, docs, emb, ChunkSettings(), quiet=args.json)
        report["index_build_s"] = time.perf_counter() - t0
        report["index"] = "pgvector" if _is_pg(spec) else "sqlite"
        with idx:
            report["chunks"] = idx.stats()["chunks"]
            for mode in [m for m in args.modes.split(",") if m]:
                bar = progress_bar(len(qs), enabled=not args.json, desc=mode, unit="q")
                report[mode] = retrieval_metrics(idx, qs, mode, progress=bar)
            if args.model:
                from . import load_model
                from ..rag.answer import answer, closed_book

                model, tok = load_model(args.model)
                sub = qs[:args.answer_limit]
                res = {"closed_book": [], "rag": []}
                bar = progress_bar(len(sub), enabled=not args.json, desc="answer", unit="q")
                for q in sub:
                    res["closed_book"].append(em_f1(closed_book(q.question, model, tok), q.answers))
                    a = answer(q.question, idx, model, tok, k=3, mode="hybrid", min_score=-1.0, max_new_tokens=64)
                    res["rag"].append(em_f1(a.text, q.answers))
                    bar.update(1)
                report["answers"] = {"questions": len(sub), "model": args.model} | {
                    name: {"exact_match": sum(x[0] for x in r) / len(r), "f1": sum(x[1] for x in r) / len(r)}
                    for name, r in res.items()}
    if args.json:
        print(json.dumps(report))
        return 0
    print(json.dumps(report, indent=1))
    return 0
