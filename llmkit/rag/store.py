"""The default index: one SQLite file, persistent, updated in place.

Tables: meta (embedding model identity, chunk settings), docs (doc_id, source, text hash),
chunks (text, character span, term count, the embedding as a float32 blob), chunks_fts (an FTS5 table
over the same text, rowid = chunk rowid) and df (document frequency per term).

Lexical search uses FTS5 only to find the candidate chunks holding any query term; it then scores them
with Okapi BM25 (retrieval.py) from the stored term counts, because FTS5's own bm25() fixes k1 = 1.2,
b = 0.75 and uses a different idf (log((N - n + 0.5) / (n + 0.5)) floored at 1e-6), so its scores
would not match `rank-bm25` or the PostgreSQL backend. Every chunk holding a query term is a candidate,
so the BM25 ranking is exact.

Vectors (unit float32 blobs in `chunks`) are searched exactly by llmkit/rag/vectors.py: a FAISS
IndexFlatIP kept in PATH.faiss beside the database when faiss-cpu is installed, else numpy brute force
(the (N, C) matrix read once per process); both are updated in place after each write and reloaded when
another process has written (meta.generation, bumped in every write transaction). At C = 384 a
100k-chunk index is 150 MB and one query a single matrix-vector product (BENCHMARKS.md has the latency).
Writes run in one `BEGIN IMMEDIATE` transaction per add/delete call.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from pathlib import Path

import numpy as np

from ..errors import LLMKitError
from .index import ChunkSettings, Index
from .loaders import Document
from .retrieval import Hit, bm25_idf, bm25_rank
from .vectors import vector_backend

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
                 k1: float = 1.5, b: float = 0.75, vectors: str = "auto"):
        super().__init__(embedder, chunking)
        self.path = Path(path)
        self.k1, self.b = k1, b
        self.vectors = vectors  # "auto" (faiss if installed) | "faiss" | "numpy"
        self._vec, self._vec_gen = None, None  # the vector backend and the generation it reflects
        self._pending: list[tuple[str, list[int], list]] = []  # vector adds/removals of the open transaction
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
                    rec = self.settings_record() | {"version": VERSION, "instance": uuid.uuid4().hex}
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rec.items()])
            meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise LLMKitError(f"{self.path} is not an llmkit index ({e})") from None
        if "embedder" not in meta:
            raise LLMKitError(f"{self.path} is not an llmkit index (no embedding model recorded)")
        self.check_embedder(meta["embedder"], str(self.path))
        self.chunking = ChunkSettings(**meta["chunking"])
        self._cache = None  # BM25 statistics, dropped on every write
        if vectors != "auto":
            self._vector_index()  # an unknown or missing backend is an error at open

    def _count(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(json.loads(row[0])) if row else 0

    def _generation(self) -> str | None:
        """This database's state: "<instance>:<writes>" (None for an index made before instance ids)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        return f"{json.loads(row[0])}:{self._count()}" if row else None

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = [], []
        for rowid, blob in self.db.execute("SELECT id, vec FROM chunks ORDER BY id"):
            ids.append(rowid)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
        return (np.array(ids, dtype=np.int64),
                np.stack(vecs) if vecs else np.zeros((0, self.embedder.dim), np.float32))

    def _vector_index(self):
        gen = self._generation()
        if self._vec is None or self._vec_gen != gen:  # first use, or another process wrote
            self._vec = vector_backend(self.path, self.embedder.dim, self._rows, gen, self.vectors)
            self._vec_gen = gen
        return self._vec

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        self._pending = []
        try:
            yield
            before = self._generation()
            n = self._count() + 1
            self.db.execute("INSERT INTO meta VALUES ('generation', ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                            (json.dumps(n), json.dumps(n)))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._cache = None
        # committed: bring a loaded vector index to the same state (else it loads fresh when first searched)
        if self._vec is not None and self._vec_gen == before:
            for op, ids, vecs in self._pending:
                self._vec.add(ids, np.stack(vecs)) if op == "add" else self._vec.remove(ids)
            self._vec_gen = self._generation()
            self._vec.save(self._vec_gen)
        self._pending = []

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT doc_id, sha FROM docs"))

    def _write_doc(self, doc: Document, sha: str, rows) -> None:
        self.db.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (doc.doc_id, doc.source, sha, json.dumps(doc.meta)))
        ids, vecs = [], []
        for chunk_id, text, start, end, ts, vec in rows:
            cur = self.db.execute("INSERT INTO chunks (chunk_id, doc_id, text, start, end_, n_terms, terms, vec) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (chunk_id, doc.doc_id, text, start, end, len(ts), " ".join(ts),
                                   np.asarray(vec, dtype=np.float32).tobytes()))
            self.db.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (cur.lastrowid, text))
            self.db.executemany("INSERT INTO df VALUES (?, 1) ON CONFLICT (term) DO UPDATE SET n = n + 1",
                                [(t,) for t in set(ts)])
            ids.append(cur.lastrowid)
            vecs.append(np.asarray(vec, dtype=np.float32))
        if ids:
            self._pending.append(("add", ids, vecs))

    def _delete_doc(self, doc_id: str) -> bool:
        rows = self.db.execute("SELECT id, terms FROM chunks WHERE doc_id = ?", (doc_id,)).fetchall()
        for rowid, ts in rows:
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (rowid,))
            self.db.executemany("UPDATE df SET n = n - 1 WHERE term = ?", [(t,) for t in set(ts.split())])
        self.db.execute("DELETE FROM df WHERE n <= 0")
        if rows:
            self._pending.append(("remove", [r[0] for r in rows], []))
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return self.db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,)).rowcount > 0

    def _stats(self) -> dict:
        if self._cache is None:
            n, avgdl = self.db.execute("SELECT count(*), avg(n_terms) FROM chunks").fetchone()
            dfs = dict(self.db.execute("SELECT term, n FROM df"))
            idf = bm25_idf(np.array(list(dfs.values()), dtype=np.float64), n)
            self._cache = {"avgdl": float(avgdl) if n else 1.0, "idf": dict(zip(dfs, idf))}
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
        found = self._vector_index().search(v, n)  # [(rowid, cosine)], best first
        if not found:
            return []
        marks = ",".join("?" * len(found))
        names = dict(self.db.execute(f"SELECT id, chunk_id FROM chunks WHERE id IN ({marks})", [r for r, _ in found]))
        return [(names[r], s) for r, s in found]

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
