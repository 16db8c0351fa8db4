"""The same index on PostgreSQL + pgvector, for when one SQLite file on one machine is outgrown.

Tables mirror store.py: meta, docs, chunks (text, terms, a `tsvector` of the terms with a GIN index,
`vector(C)` with an HNSW index, Malkov & Yashunin 2018, on cosine distance) and df. Lexical candidates
come from the tsvector (`@@` an OR of the query terms) and are scored with the same Okapi BM25 as the
SQLite store (ts_rank is a tf-weighting without idf or length normalisation à la BM25), so both
backends rank lexically alike; dense search is `ORDER BY vec <=> q LIMIT n` (approximate through HNSW,
score = 1 - cosine distance). Needs `psycopg` (the `rag` extra); a server with pgvector, e.g. the
`pgserver` wheel (PostgreSQL + pgvector in a pip package; tests/test_rag_store.py starts one).
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import LLMKitError
from .index import ChunkSettings, Index
from .loaders import Document
from .retrieval import Hit, bm25_idf, bm25_rank


def _vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.8g}" for x in np.asarray(v, dtype=np.float32)) + "]"


class PgVectorIndex(Index):
    def __init__(self, dsn: str, embedder, chunking: ChunkSettings | None = None, create: bool = False,
                 prefix: str = "llmkit", k1: float = 1.5, b: float = 0.75):
        super().__init__(embedder, chunking)
        try:
            import psycopg
        except ImportError:
            raise LLMKitError("the PostgreSQL index needs psycopg: pip install 'llmkit[rag]'") from None
        self.k1, self.b, self.p = k1, b, prefix
        if not prefix.isidentifier():
            raise LLMKitError(f"table prefix must be an identifier, got {prefix!r}")
        try:
            self.db = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise LLMKitError(f"cannot connect to PostgreSQL at {dsn}: {str(e).strip().splitlines()[0]}") from None
        p = prefix
        exists = self.db.execute("SELECT to_regclass(%s)", (f"{p}_meta",)).fetchone()[0] is not None
        if not exists and not create:
            raise LLMKitError(f"no llmkit index with prefix {p!r} in {dsn} (build it with `llmkit rag index`)")
        if exists and create:
            raise LLMKitError(f"an llmkit index with prefix {p!r} already exists in {dsn}")
        if create:
            with self.db.transaction():
                self.db.execute("CREATE EXTENSION IF NOT EXISTS vector")
                self.db.execute(f"CREATE TABLE {p}_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self.db.execute(f"CREATE TABLE {p}_docs (doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, "
                                f"sha TEXT NOT NULL, meta TEXT)")
                self.db.execute(f"CREATE TABLE {p}_chunks (id BIGSERIAL PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, "
                                f"doc_id TEXT NOT NULL, text TEXT NOT NULL, start_ INT, end_ INT, n_terms INT NOT NULL, "
                                f"terms TEXT NOT NULL, tsv TSVECTOR NOT NULL, vec vector({embedder.dim}) NOT NULL)")
                self.db.execute(f"CREATE INDEX ON {p}_chunks (doc_id)")
                self.db.execute(f"CREATE INDEX ON {p}_chunks USING GIN (tsv)")
                self.db.execute(f"CREATE INDEX ON {p}_chunks USING hnsw (vec vector_cosine_ops)")
                self.db.execute(f"CREATE TABLE {p}_df (term TEXT PRIMARY KEY, n INT NOT NULL)")
                for k, v in self.settings_record().items():
                    self.db.execute(f"INSERT INTO {p}_meta VALUES (%s, %s)", (k, json.dumps(v)))
        meta = {k: json.loads(v) for k, v in self.db.execute(f"SELECT key, value FROM {p}_meta")}
        self.check_embedder(meta["embedder"], f"{dsn} ({p})")
        self.chunking = ChunkSettings(**meta["chunking"])
        self._cache = None

    def close(self) -> None:
        self.db.close()

    def _transaction(self):
        self._cache = None
        return self.db.transaction()

    def doc_hashes(self) -> dict[str, str]:
        return dict(self.db.execute(f"SELECT doc_id, sha FROM {self.p}_docs").fetchall())

    def _write_doc(self, doc: Document, sha: str, rows) -> None:
        p = self.p
        self.db.execute(f"INSERT INTO {p}_docs VALUES (%s, %s, %s, %s)", (doc.doc_id, doc.source, sha, json.dumps(doc.meta)))
        with self.db.cursor() as cur:
            cur.executemany(f"INSERT INTO {p}_chunks (chunk_id, doc_id, text, start_, end_, n_terms, terms, tsv, vec) "
                            f"VALUES (%s, %s, %s, %s, %s, %s, %s, to_tsvector('simple', %s), %s::vector)",
                            [(cid, doc.doc_id, text, s, e, len(ts), " ".join(ts), " ".join(ts), _vec(v))
                             for cid, text, s, e, ts, v in rows])
            df = sorted({t for r in rows for t in set(r[4])})
            cur.executemany(f"INSERT INTO {p}_df VALUES (%s, 1) ON CONFLICT (term) DO UPDATE SET n = {p}_df.n + 1",
                            [(t,) for t in df])
        self._cache = None

    def _delete_doc(self, doc_id: str) -> bool:
        p = self.p
        rows = self.db.execute(f"SELECT terms FROM {p}_chunks WHERE doc_id = %s", (doc_id,)).fetchall()
        with self.db.cursor() as cur:
            cur.executemany(f"UPDATE {p}_df SET n = n - 1 WHERE term = %s", [(t,) for (ts,) in rows for t in set(ts.split())])
        self.db.execute(f"DELETE FROM {p}_df WHERE n <= 0")
        self.db.execute(f"DELETE FROM {p}_chunks WHERE doc_id = %s", (doc_id,))
        self._cache = None
        return self.db.execute(f"DELETE FROM {p}_docs WHERE doc_id = %s", (doc_id,)).rowcount > 0

    def _stats(self) -> dict:
        if self._cache is None:
            n, avgdl = self.db.execute(f"SELECT count(*), avg(n_terms) FROM {self.p}_chunks").fetchone()
            dfs = dict(self.db.execute(f"SELECT term, n FROM {self.p}_df").fetchall())
            idf = bm25_idf(np.array(list(dfs.values()), dtype=np.float64), n)
            self._cache = {"avgdl": float(avgdl or 1.0), "idf": dict(zip(dfs, idf))}
        return self._cache

    def _lexical(self, q: list[str], n: int) -> list[tuple[str, float]]:
        st = self._stats()
        q = [t for t in q if t in st["idf"]]
        if not q:
            return []
        # terms are already our tokens: 'simple' config and quoted lexemes keep them verbatim
        tsq = " | ".join("'" + t.replace("'", "''") + "'" for t in sorted(set(q)))
        rows = self.db.execute(f"SELECT chunk_id, terms, n_terms FROM {self.p}_chunks "
                               f"WHERE tsv @@ to_tsquery('simple', %s)", (tsq,)).fetchall()
        return bm25_rank(q, rows, st["idf"], st["avgdl"], n, self.k1, self.b)

    def _dense(self, v: np.ndarray, n: int) -> list[tuple[str, float]]:
        with self.db.transaction():
            self.db.execute(f"SET LOCAL hnsw.ef_search = {max(40, int(n))}")  # HNSW returns at most ef_search rows
            rows = self.db.execute(f"SELECT chunk_id, 1 - (vec <=> %s::vector) FROM {self.p}_chunks "
                                   f"ORDER BY vec <=> %s::vector LIMIT %s", (_vec(v), _vec(v), n)).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def _fetch(self, chunk_ids: list[str]) -> dict[str, Hit]:
        if not chunk_ids:
            return {}
        rows = self.db.execute(f"SELECT c.chunk_id, c.doc_id, c.text, d.source, c.start_, c.end_ FROM {self.p}_chunks c "
                               f"JOIN {self.p}_docs d ON d.doc_id = c.doc_id WHERE c.chunk_id = ANY(%s)",
                               (list(chunk_ids),)).fetchall()
        return {r[0]: Hit(r[0], r[1], r[2], r[3], 0.0, {"start": r[4], "end": r[5]}) for r in rows}

    def stats(self) -> dict:
        return {"documents": self.db.execute(f"SELECT count(*) FROM {self.p}_docs").fetchone()[0],
                "chunks": self.db.execute(f"SELECT count(*) FROM {self.p}_chunks").fetchone()[0],
                "embedder": self.embedder.identity}


def open_index(spec: str, embedder, chunking: ChunkSettings | None = None, create: bool = False) -> Index:
    """A path -> the SQLite store; a postgresql:// URI -> this backend."""
    if spec.startswith(("postgresql://", "postgres://")):
        return PgVectorIndex(spec, embedder, chunking, create)
    from .store import SQLiteIndex

    return SQLiteIndex(spec, embedder, chunking, create)
