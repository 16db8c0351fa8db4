"""Retrieval-augmented generation (Lewis et al. 2020): documents -> chunks -> an index -> ranked chunks
-> an answer that cites them. One file per concern, each usable alone:

  loaders.py    .txt / .md / .html / .pdf files -> `Document`(doc_id, text, source)
  chunking.py   token-aware chunkers (fixed with overlap, recursive by separators, by sentences)
  embeddings.py all-MiniLM-L6-v2 through llmkit's `Encoder`: mean pooling + L2 normalisation
  retrieval.py  BM25 / TF-IDF over term statistics, cosine search, RRF and weighted-score fusion
  store.py      the default index: one SQLite file (FTS5 candidates, float32 vector blobs)
  pgvector.py   the same interface on PostgreSQL + pgvector (HNSW, tsvector)
  answer.py     retrieved chunks -> a budgeted prompt -> an answer with [n] citations, or "I don't know"
  squad.py      recall@k / MRR and answer EM / F1 on SQuAD-format data (`llmkit rag eval`)

An index's `search(query, k, mode)` returns `Hit`s (text, source, score, ...), best first.
"""
