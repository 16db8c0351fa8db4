"""Dense query latency of the SQLite index: FAISS (IndexFlatIP in PATH.faiss) vs numpy brute force.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/rag_vectors.py --from /tmp/ragbench/squad.sqlite

A copy of an existing index (`llmkit rag eval --index PATH` builds the SQuAD one) is opened twice, once
per backend; the queries are the index's own chunk vectors (the store's search cost only, no encoder),
asked of the two backends alternately so both see the same machine load. Checks that both return the
same chunk ids, and prints one JSON line with median / p95 per backend.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class StoredEmbedder:
    """identity/dim of the index's model without loading it (no text is embedded here)."""

    def __init__(self, identity, dim):
        self.identity, self.dim, self.tokenizer = identity, dim, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", required=True)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import sqlite3

    from llmkit.rag.store import SQLiteIndex

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "idx.sqlite"
        shutil.copy(args.src, path)
        db = sqlite3.connect(path)
        ident = json.loads(db.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()[0])
        queries = [np.frombuffer(b, np.float32) for (b,) in db.execute("SELECT vec FROM chunks ORDER BY id")]
        db.close()
        emb = StoredEmbedder(ident, len(queries[0]))
        t0 = time.perf_counter()
        fa = SQLiteIndex(path, emb, vectors="faiss")
        fa._vector_index()
        t_build = time.perf_counter() - t0
        nu = SQLiteIndex(path, emb, vectors="numpy")
        nu._vector_index()
        times = {"faiss": [], "numpy": []}
        for _ in range(args.repeat):
            for v in queries:
                got = {}
                for name, idx in (("faiss", fa), ("numpy", nu)):
                    t = time.perf_counter()
                    got[name] = idx._dense(v, args.k)
                    times[name].append(time.perf_counter() - t)
                assert [c for c, _ in got["faiss"]] == [c for c, _ in got["numpy"]]
        out = {"chunks": len(queries), "queries": len(times["faiss"]), "k": args.k,
               "faiss_build_s": round(t_build, 3)}
        for name, ts in times.items():
            ts = sorted(ts)
            out[name] = {"median_ms": round(1e3 * statistics.median(ts), 3),
                         "p95_ms": round(1e3 * ts[int(0.95 * (len(ts) - 1))], 3)}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
