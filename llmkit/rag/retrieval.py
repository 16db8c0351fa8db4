"""Scoring and fusion, free of storage: lexical (BM25, TF-IDF), dense (cosine), and hybrids.

BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond"), Okapi form
with rank-bm25's idf floor so scores equal `rank_bm25.BM25Okapi` on the same terms (tests/test_rag_retrieval.py):

  idf(t)   = log((N - n_t + 0.5) / (n_t + 0.5)), and eps * mean(idf) where that is negative
  s(q, d)  = sum_{t in q} idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))

TF-IDF: sublinear-free tf * smooth idf, idf(t) = ln((1 + N) / (1 + n_t)) + 1, rows L2-normalised, cosine.
Dense: embeddings are unit vectors, so cosine = dot product.

Hybrids over two ranked candidate lists:
  RRF (Cormack, Clarke & Buettcher 2009): s(d) = sum_lists 1 / (k + rank(d)), k = 60, ranks from 1;
  weighted: each list's scores min-max normalised to [0, 1] (absent = 0), s = w * dense + (1 - w) * lexical.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import LLMKitError, closest

# letters and digits, lower-cased: the same split as SQLite FTS5's unicode61 tokenizer, so FTS5 finds
# every chunk that holds a query term and BM25 can then score them exactly
_WORD = re.compile(r"[^\W_]+")

MODES = ("bm25", "dense", "hybrid", "weighted")


def terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Hit:
    """One ranked chunk: `text` from `source`, `score` under the mode that ranked it."""
    chunk_id: str
    doc_id: str
    text: str
    source: str
    score: float
    meta: dict = field(default_factory=dict)


def bm25_idf(df: np.ndarray, n_docs: int, epsilon: float = 0.25) -> np.ndarray:
    """rank-bm25's idf: Robertson-Sparck Jones with negative values (n_t > N/2) floored to eps * mean idf."""
    idf = np.log((n_docs - df + 0.5) / (df + 0.5))
    return np.where(idf < 0, epsilon * idf.mean(), idf) if len(idf) else idf


def bm25_term(tf: np.ndarray, doc_len: np.ndarray, avgdl: float, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """The saturating tf part of one term's BM25 weight, over documents."""
    return tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len / avgdl))


def bm25_rank(q: list[str], rows: list[tuple[str, str, int]], idf: dict[str, float], avgdl: float, n: int,
              k1: float = 1.5, b: float = 0.75) -> list[tuple[str, float]]:
    """BM25 over candidate rows (id, space-joined terms, term count) with corpus-wide idf -> top n (id, score).
    The stores call this on the chunks their full-text index (FTS5, tsvector) found for the query."""
    q = [t for t in q if t in idf]
    if not q or not rows:
        return []
    want = set(q)
    counts = [Counter(t for t in ts.split() if t in want) for _, ts, _ in rows]
    doc_len = np.array([r[2] for r in rows], dtype=np.float64)
    scores = np.zeros(len(rows))
    for t in q:
        tf = np.array([c[t] for c in counts], dtype=np.float64)
        scores += idf[t] * bm25_term(tf, doc_len, avgdl, k1, b)
    return [(rows[i][0], float(scores[i])) for i in top_k(scores, n)]


class BM25:
    """In-memory Okapi BM25 over pre-tokenised documents (lists of terms)."""

    def __init__(self, corpus: list[list[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        if not corpus:
            raise LLMKitError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in corpus]
        self.doc_len = np.array([len(d) for d in corpus], dtype=np.float64)
        self.avgdl = float(self.doc_len.mean()) or 1.0
        df = Counter(t for c in self.tfs for t in c)
        self.vocab = list(df)
        self.idf = dict(zip(self.vocab, bm25_idf(np.array([df[t] for t in self.vocab], dtype=np.float64),
                                                 len(corpus), epsilon)))

    def scores(self, query: list[str]) -> np.ndarray:
        s = np.zeros(len(self.tfs))
        for t in query:  # repeated query terms count again, as in rank-bm25
            if t in self.idf:
                tf = np.array([c.get(t, 0) for c in self.tfs], dtype=np.float64)
                s += self.idf[t] * bm25_term(tf, self.doc_len, self.avgdl, self.k1, self.b)
        return s


class TfIdf:
    """TF-IDF vectors (smooth idf, L2-normalised rows) and cosine scores, as scikit-learn's defaults."""

    def __init__(self, corpus: list[list[str]]):
        df = Counter(t for d in corpus for t in set(d))
        n = len(corpus)
        self.index = {t: i for i, t in enumerate(sorted(df))}
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in sorted(df)])
        self.matrix = np.stack([self.vector(d) for d in corpus]) if corpus else np.zeros((0, len(df)))

    def vector(self, doc: list[str]) -> np.ndarray:
        v = np.zeros(len(self.index))
        for t, c in Counter(doc).items():
            if t in self.index:
                v[self.index[t]] = c * self.idf[self.index[t]]
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def scores(self, query: list[str]) -> np.ndarray:
        return self.matrix @ self.vector(query)


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return sorted(idx.tolist(), key=lambda i: (-scores[i], i))


def rrf(rankings: list[list[str]], k: int = 60) -> dict[str, float]:
    """Reciprocal-rank fusion: id -> sum over rankings of 1 / (k + rank), rank 1 = best."""
    out: dict[str, float] = {}
    for ranking in rankings:
        for r, i in enumerate(ranking, start=1):
            out[i] = out.get(i, 0.0) + 1.0 / (k + r)
    return out


def minmax(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in scores.items()}


def weighted(lexical: dict[str, float], dense: dict[str, float], dense_weight: float = 0.5) -> dict[str, float]:
    """w * minmax(dense) + (1 - w) * minmax(lexical) over the union (a list missing an id gives it 0)."""
    if not 0 <= dense_weight <= 1:
        raise LLMKitError(f"dense weight must be in [0, 1], got {dense_weight}")
    a, b = minmax(lexical), minmax(dense)
    return {i: (1 - dense_weight) * a.get(i, 0.0) + dense_weight * b.get(i, 0.0) for i in set(a) | set(b)}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LLMKitError(f"unknown search mode {mode!r}{closest(mode, MODES)}; choose one of {', '.join(MODES)}")
    return mode


def fuse(mode: str, lexical: list[tuple[str, float]], dense: list[tuple[str, float]], k: int,
         rrf_k: int = 60, dense_weight: float = 0.5) -> list[tuple[str, float]]:
    """Ranked (id, score) lists of each retriever -> the mode's top k (id, score)."""
    check_mode(mode)
    if mode == "bm25":
        fused = dict(lexical)
    elif mode == "dense":
        fused = dict(dense)
    elif mode == "hybrid":
        fused = rrf([[i for i, _ in lexical], [i for i, _ in dense]], rrf_k)
    else:
        fused = weighted(dict(lexical), dict(dense), dense_weight)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
