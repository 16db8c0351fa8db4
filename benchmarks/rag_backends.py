"""Index build time and query latency: the SQLite store vs PostgreSQL + pgvector (a pgserver instance).

    OMP_NUM_THREADS=2 nice -n 19 python benchmarks/rag_backends.py --from /tmp/ragbench/squad.sqlite

Embedding is taken out of both: chunk vectors are read from an existing SQLite index of the SQuAD
paragraphs (`llmkit rag eval --index PATH` builds one) and the question vectors are computed once, so
the numbers are the stores' own write and search costs. Prints one JSON line.
"""

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class CachedEmbedder:
    """Answers embed() from a text -> vector table; identity and tokenizer of the real model."""

    def __init__(self, real, table):
        self.real, self.table = real, table
        self.identity, self.dim, self.tokenizer = real.identity, real.dim, real.tokenizer

    def embed(self, texts, progress=None):
        return np.stack([self.table[t] for t in texts])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", required=True)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    import pgserver

    from llmkit.rag.embeddings import Embedder
    from llmkit.rag.pgvector import PgVectorIndex
    from llmkit.rag.squad import load_squad
    from llmkit.rag.store import SQLiteIndex

    data = Path(os.environ.get("LLMKIT_SHARED_DATA", "../shared/data")) / "rag" / "squad_expmrc_dev.json"
    docs, qs = load_squad(data)
    real = Embedder()
    con = sqlite3.connect(args.src)
    table = {t: np.frombuffer(v, dtype=np.float32) for t, v in con.execute("SELECT text, vec FROM chunks")}
    questions = [q.question for q in qs]
    table.update(zip(questions, real.embed(questions)))
    emb = CachedEmbedder(real, table)
    out = {"documents": len(docs), "chunks": con.execute("SELECT count(*) FROM chunks").fetchone()[0],
           "queries": len(questions)}
    with tempfile.TemporaryDirectory() as tmp:
        srv = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        try:
            for name, make in [("sqlite", lambda: SQLiteIndex(Path(tmp) / "i.sqlite", emb, create=True)),
                               ("pgvector", lambda: PgVectorIndex(srv.get_uri(), emb, create=True))]:
                t0 = time.perf_counter()
                idx = make()
                idx.add(docs)  # chunking runs again (same settings), embedding is a lookup
                res = {"build_s": time.perf_counter() - t0}
                for mode in ("bm25", "dense", "hybrid"):
                    lat = []
                    for q in questions:
                        t = time.perf_counter()
                        idx.search(q, args.k, mode)
                        lat.append(time.perf_counter() - t)
                    res[f"{mode}_ms_median"] = 1000 * statistics.median(lat)
                    res[f"{mode}_ms_p95"] = 1000 * sorted(lat)[int(0.95 * (len(lat) - 1))]
                out[name] = res
                idx.close()
        finally:
            srv.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
