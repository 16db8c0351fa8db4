"""The default index: one SQLite file, persistent, updated in place.

Tables: meta (embedding model identity, chunk settings), docs (doc_id, source, text hash),
chunks (text, character span, term count, the embedding as a float32 blob), chunks_fts (an FTS5 table
over the same text, rowid = chunk rowid) and df (document frequency per term).

Lexical search uses FTS5 only to find the candidate chunks holding any query term; it then scores them
with Okapi BM25 (retrieval.py) from the stored term counts, because FTS5's own bm25() fixes k1 = 1.2,
b = 0.75 and uses a different idf (log((N - n + 0.5) / (n + 0.5)) floored at 1e-6), so its scores
would not match `rank-bm25` or the PostgreSQL backend. Every chunk holding a query term is a candidate,
so the BM25 ranking is exact.

Vectors are searched brute force with numpy: the (N, C) float32 matrix is read once per process and
after each write; at C = 384 a 100k-chunk index is 150 MB and one query a single matrix-vector product
(BENCHMARKS.md has the latency). Writes run in one `BEGIN IMMEDIATE` transaction per add/delete call.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import LLMKitError
from .index import ChunkSettings, Index
from .loaders import Document
from .retrieval import Hit, bm25_idf, bm25_rank, top_k

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, sha TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, doc_id TEXT NOT NULL, text TEXT NOT NULL,
    start INTEGER, end_ INTEGER, n_terms INTEGER NOT NULL, terms TEXT NOT NULL, vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text);
CREATE TABLE IF NOT EXISTS df (term TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""
VERSION = "1"


class SQLiteIndex(Index):
    def __init__(self, path: str | Path, embedder, chunking: ChunkSettings | None = None, create: bool = False,
                 k1: float = 1.5, b: float = 0.75):
        super().__init__(embedder, chunking)
        self.path = Path(path)
        self.k1, self.b = k1, b
        exists = self.path.is_file()
        if not exists and not create:
            raise LLMKitError(f"index {self.path} does not exist (build it with `llmkit rag index`)")
        if exists and create:
            raise LLMKitError(f"index {self.path} already exists")
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
            if create:
                with self._transaction():
                    for stmt in SCHEMA.strip().split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    rec = self.settings_record() | {"version": VERSION}
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rec.items()])
            meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise LLMKitError(f"{self.path} is not an llmkit index ({e})") from None
        if "embedder" not in meta:
            raise LLMKitError(f"{self.path} is not an llmkit index (no embedding model recorded)")
        self.check_embedder(meta["embedder"], str(self.path))
        self.chunking = ChunkSettings(**meta["chunking"])
        self._cache = None  # (chunk ids, (N, C) matrix) / idf stats, dropped on every write

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._cache = None

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT doc_id, sha FROM docs"))

    def _write_doc(self, doc: Document, sha: str, rows) -> None:
        self.db.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (doc.doc_id, doc.source, sha, json.dumps(doc.meta)))
        for chunk_id, text, start, end, ts, vec in rows:
            cur = self.db.execute("INSERT INTO chunks (chunk_id, doc_id, text, start, end_, n_terms, terms, vec) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (chunk_id, doc.doc_id, text, start, end, len(ts), " ".join(ts),
                                   np.asarray(vec, dtype=np.float32).tobytes()))
            self.db.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (cur.lastrowid, text))
            self.db.executemany("INSERT INTO df VALUES (?, 1) ON CONFLICT (term) DO UPDATE SET n = n + 1",
                                [(t,) for t in set(ts)])

    def _delete_doc(self, doc_id: str) -> bool:
        rows = self.db.execute("SELECT id, terms FROM chunks WHERE doc_id = ?", (doc_id,)).fetchall()
        for rowid, ts in rows:
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (rowid,))
            self.db.executemany("UPDATE df SET n = n - 1 WHERE term = ?", [(t,) for t in set(ts.split())])
        self.db.execute("DELETE FROM df WHERE n <= 0")
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return self.db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,)).rowcount > 0

    def _stats(self) -> dict:
        if self._cache is None:
            ids, vecs, n_terms = [], [], []
            for cid, blob, nt in self.db.execute("SELECT chunk_id, vec, n_terms FROM chunks ORDER BY id"):
                ids.append(cid)
                vecs.append(np.frombuffer(blob, dtype=np.float32))
                n_terms.append(nt)
            dfs = dict(self.db.execute("SELECT term, n FROM df"))
            idf = bm25_idf(np.array(list(dfs.values()), dtype=np.float64), len(ids))
            self._cache = {"ids": ids, "matrix": np.stack(vecs) if vecs else np.zeros((0, self.embedder.dim), np.float32),
                           "avgdl": float(np.mean(n_terms)) if n_terms else 1.0, "idf": dict(zip(dfs, idf))}
        return self._cache

    def _lexical(self, q: list[str], n: int) -> list[tuple[str, float]]:
        st = self._stats()
        q = [t for t in q if t in st["idf"]]
        if not q:
            return []
        match = " OR ".join(f'"{t}"' for t in sorted(set(q)))
        rows = self.db.execute("SELECT c.chunk_id, c.terms, c.n_terms FROM chunks_fts f JOIN chunks c ON c.id = f.rowid "
                               "WHERE chunks_fts MATCH ?", (match,)).fetchall()
        if not rows:
            return []
        return bm25_rank(q, rows, st["idf"], st["avgdl"], n, self.k1, self.b)

    def _dense(self, v: np.ndarray, n: int) -> list[tuple[str, float]]:
        st = self._stats()
        if not st["ids"]:
            return []
        scores = st["matrix"] @ v.astype(np.float32)  # (N,) cosine: rows and query are unit vectors
        return [(st["ids"][i], float(scores[i])) for i in top_k(scores, n)]

    def _fetch(self, chunk_ids: list[str]) -> dict[str, Hit]:
        if not chunk_ids:
            return {}
        marks = ",".join("?" * len(chunk_ids))
        rows = self.db.execute(f"SELECT c.chunk_id, c.doc_id, c.text, d.source, c.start, c.end_ FROM chunks c "
                               f"JOIN docs d ON d.doc_id = c.doc_id WHERE c.chunk_id IN ({marks})", chunk_ids)
        return {r[0]: Hit(r[0], r[1], r[2], r[3], 0.0, {"start": r[4], "end": r[5]}) for r in rows}

    def stats(self) -> dict:
        return {"documents": self.db.execute("SELECT count(*) FROM docs").fetchone()[0],
                "chunks": self.db.execute("SELECT count(*) FROM chunks").fetchone()[0],
                "embedder": self.embedder.identity}
