"""The SQLite store's vector search: exact inner product over the unit vectors in the `chunks` table,
by FAISS when `faiss-cpu` is installed (the `rag-faiss` extra), else by numpy.

SQLite stays the one source of truth: every chunk's vector is a float32 blob in its row, written in the
same transaction as the text. The FAISS index (IndexIDMap2 over IndexFlatIP, ids = chunk rowids) is a
file beside the database, PATH.faiss, holding the database's state tag ("<instance uuid>:<generation>")
and the serialised index. The store bumps `meta.generation` inside every write transaction; after the
commit it applies the same adds and removals to the in-memory FAISS index and replaces the file
atomically. A FAISS file whose tag is not the database's (another database rebuilt at the same path,  a crash between the commit and the save, or a write by a process
without faiss) is rebuilt from the rows on open, so the file can never answer for a state the database
is not in. IndexFlatIP is exact, so both paths rank the same chunks (tests/test_rag_store.py); FAISS's
BLAS kernel scores a query in one pass without the Python-side id list of the numpy path.

    backend = vector_backend(path, dim, load_rows, generation, prefer="auto")   # "faiss" | "numpy" | "auto"
    backend.search(v, n) -> [(rowid, score)]; backend.add(rowids, (n, C) vectors); backend.remove(rowids)
    backend.save(generation)   # after a commit
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LLMKitError
from .retrieval import top_k

Rows = Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (N,) int64 rowids, (N, C) float32 unit vectors


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class NumpyVectors:
    """Brute force: the (N, C) matrix read once, one matrix-vector product per query."""

    name = "numpy"

    def __init__(self, dim: int, rows: Rows):
        self.ids, self.matrix = rows()

    def search(self, v: np.ndarray, n: int) -> list[tuple[int, float]]:
        if not len(self.ids):
            return []
        scores = self.matrix @ v.astype(np.float32)  # (N,) cosine: rows and query are unit vectors
        return [(int(self.ids[i]), float(scores[i])) for i in top_k(scores, n)]

    def add(self, ids, vecs) -> None:
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        self.matrix = np.concatenate([self.matrix, np.asarray(vecs, np.float32).reshape(len(ids), -1)])

    def remove(self, ids) -> None:
        keep = ~np.isin(self.ids, np.asarray(ids, np.int64))
        self.ids, self.matrix = self.ids[keep], self.matrix[keep]

    def save(self, generation) -> None:  # nothing beside the database
        pass


class FaissVectors:
    name = "faiss"

    def __init__(self, dim: int, rows: Rows, path: Path, generation: str | None):
        import faiss

        self.faiss, self.path = faiss, path
        self.index = self._load(generation)
        if self.index is None or self.index.d != dim:
            ids, mat = rows()
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            if len(ids):
                self.index.add_with_ids(np.ascontiguousarray(mat, np.float32), ids.astype(np.int64))
            self.save(generation)

    def _load(self, generation: str | None):
        if generation is None or not self.path.is_file():  # an untagged (older) database trusts no file
            return None
        data = self.path.read_bytes()
        n = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
        if n < 0 or data[4:4 + n] != generation.encode():
            return None  # stale: rebuilt from the rows
        try:
            return self.faiss.deserialize_index(np.frombuffer(data[4 + n:], dtype=np.uint8))
        except RuntimeError:
            return None  # unreadable: rebuilt from the rows

    def search(self, v: np.ndarray, n: int) -> list[tuple[int, float]]:
        n = min(n, self.index.ntotal)
        if n <= 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(v, np.float32).reshape(1, -1), n)  # (1, n) each
        # same order as the numpy path: score descending, ties by rowid (FAISS's tie order is unspecified)
        return sorted(((int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0), key=lambda t: (-t[1], t[0]))

    def add(self, ids, vecs) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vecs, np.float32).reshape(len(ids), -1),
                                    np.asarray(ids, np.int64))

    def remove(self, ids) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, np.int64))

    def save(self, generation: str | None) -> None:
        from ..io import atomic_write_bytes

        if generation is None:
            return
        tag = generation.encode()
        blob = self.faiss.serialize_index(self.index)  # (bytes,) uint8
        atomic_write_bytes(self.path, len(tag).to_bytes(4, "little") + tag + blob.tobytes())


def vector_backend(db_path: Path, dim: int, rows: Rows, generation: str | None, prefer: str = "auto"):
    if prefer not in ("auto", "faiss", "numpy"):
        raise LLMKitError(f"unknown vector backend {prefer!r}; choose auto, faiss or numpy")
    if prefer == "faiss" and not have_faiss():
        raise LLMKitError("the faiss vector backend needs faiss-cpu (pip install 'llmkit[rag-faiss]')")
    if prefer == "numpy" or not have_faiss():
        return NumpyVectors(dim, rows)
    return FaissVectors(dim, rows, Path(str(db_path) + ".faiss"), generation)
