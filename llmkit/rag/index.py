"""The index interface shared by the SQLite store (store.py) and PostgreSQL + pgvector (pgvector.py).

A backend stores documents as chunks with their embedding and answers two candidate queries:
`_lexical(query_terms, n)` (BM25) and `_dense(vector, n)` (cosine); this base class does the rest
once: chunking + embedding on `add`, and fusing the two lists by the search mode (retrieval.fuse).
Writes of one `add`/`delete` call are one transaction: a failure leaves the index as it was.

Every index records the embedding model's identity (embeddings.Embedder.identity) and the chunking
settings when created, and refuses to open with another model: vectors of two models do not mix.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import LLMKitError
from .chunking import chunk_text
from .loaders import Document
from .retrieval import Hit, check_mode, fuse, terms


@dataclass
class ChunkSettings:
    method: str = "sentence"
    size: int = 200  # tokens of the embedding model; with [CLS]/[SEP] within MiniLM's 256
    overlap: int = 40


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Index:
    """`add(docs)`, `delete(doc_id)`, `doc_ids()`, `search(query, k, mode)` -> ranked `Hit`s."""

    def __init__(self, embedder, chunking: ChunkSettings | None = None):
        self.embedder = embedder
        self.chunking = chunking or ChunkSettings()

    # ---- backends implement these
    def _transaction(self):
        raise NotImplementedError

    def _write_doc(self, doc: Document, sha: str, rows: list[tuple[str, str, int, int, list[str], np.ndarray]]):
        raise NotImplementedError

    def _delete_doc(self, doc_id: str) -> bool:
        raise NotImplementedError

    def doc_hashes(self) -> dict[str, str]:
        raise NotImplementedError

    def _lexical(self, q: list[str], n: int) -> list[tuple[str, float]]:
        raise NotImplementedError

    def _dense(self, v: np.ndarray, n: int) -> list[tuple[str, float]]:
        raise NotImplementedError

    def _fetch(self, chunk_ids: list[str]) -> dict[str, Hit]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- shared
    def settings_record(self) -> dict:
        return {"embedder": self.embedder.identity, "chunking": asdict(self.chunking)}

    def check_embedder(self, recorded: str, where: str) -> None:
        if recorded != self.embedder.identity:
            raise LLMKitError(f"index {where} was built with embedding model {recorded}, but this run uses "
                              f"{self.embedder.identity}; use the same model or rebuild the index (--force)")

    def doc_ids(self) -> list[str]:
        return sorted(self.doc_hashes())

    def add(self, docs: list[Document], progress=None) -> dict:
        """Add or replace documents by doc_id (unchanged ones are skipped). -> counts."""
        known = self.doc_hashes()
        todo = [d for d in docs if known.get(d.doc_id) != text_sha(d.text)]
        c = self.chunking
        per_doc = [chunk_text(d.text, self.embedder.tokenizer, c.method, c.size, c.overlap) for d in todo]
        flat = [ch.text for chunks in per_doc for ch in chunks]
        vecs = self.embedder.embed(flat, progress=progress) if flat else np.zeros((0, self.embedder.dim), np.float32)
        added = updated = 0
        pos = 0
        with self._transaction():
            for d, chunks in zip(todo, per_doc):
                rows = []
                for i, ch in enumerate(chunks):
                    rows.append((f"{d.doc_id}#{i}", ch.text, ch.start, ch.end, terms(ch.text), vecs[pos]))
                    pos += 1
                if d.doc_id in known:
                    self._delete_doc(d.doc_id)
                    updated += 1
                else:
                    added += 1
                self._write_doc(d, text_sha(d.text), rows)
        return {"added": added, "updated": updated, "unchanged": len(docs) - len(todo), "chunks": len(flat)}

    def delete(self, doc_ids: str | list[str]) -> int:
        ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        with self._transaction():
            return sum(bool(self._delete_doc(i)) for i in ids)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", candidates: int = 100,
               rrf_k: int = 60, dense_weight: float = 0.5) -> list[Hit]:
        """The k best chunks for `query`, best first; each list of a hybrid takes `candidates` ids."""
        check_mode(mode)
        if k < 1:
            raise LLMKitError(f"k must be >= 1, got {k}")
        n = max(k, candidates)
        lexical = self._lexical(terms(query), n) if mode != "dense" else []
        dense = self._dense(self.embedder.embed([query])[0], n) if mode != "bm25" else []
        ranked = fuse(mode, lexical, dense, k, rrf_k, dense_weight)
        rows = self._fetch([i for i, _ in ranked])
        cos = dict(dense)
        hits = []
        for i, s in ranked:
            h = rows[i]
            h.score = float(s)
            if i in cos:  # the query-chunk cosine, comparable across modes (answer.py's relevance threshold)
                h.meta["cosine"] = cos[i]
            hits.append(h)
        return hits
