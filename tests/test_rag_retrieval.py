"""BM25 equals rank-bm25 and TF-IDF equals scikit-learn on the same tokens; RRF and weighted fusion by hand."""

import numpy as np
import pytest

from llmkit.rag.retrieval import BM25, TfIdf, fuse, rrf, terms, top_k, weighted

CORPUS = ["The cat sat on the mat.", "Dogs and cats living together", "The quick brown fox jumps over the lazy dog",
          "A cat is a small domesticated carnivorous mammal", "Paris is the capital and largest city of France",
          "the the the cat cat dog", "Mammals are vertebrate animals", "Foxes are small omnivorous mammals"]
QUERIES = ["cat", "the cat on the mat", "small mammal", "capital of France", "unknownword", "dog dog fox"]


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (1.2, 0.5)])
def test_bm25_equals_rank_bm25(k1, b):
    rank_bm25 = pytest.importorskip("rank_bm25")
    toks = [terms(d) for d in CORPUS]
    ref = rank_bm25.BM25Okapi(toks, k1=k1, b=b)
    ours = BM25(toks, k1=k1, b=b)
    for q in QUERIES:
        np.testing.assert_allclose(ours.scores(terms(q)), ref.get_scores(terms(q)), rtol=1e-12, atol=1e-12)


def test_tfidf_equals_sklearn():
    text = pytest.importorskip("sklearn.feature_extraction.text")
    vec = text.TfidfVectorizer(tokenizer=terms, lowercase=False, token_pattern=None)
    m = vec.fit_transform(CORPUS)
    ours = TfIdf([terms(d) for d in CORPUS])
    for q in QUERIES:
        ref = (m @ vec.transform([q]).T).toarray().ravel()
        np.testing.assert_allclose(ours.scores(terms(q)), ref, atol=1e-12)


def test_rrf_by_hand():
    got = rrf([["a", "b", "c"], ["c", "a", "d"]], k=60)
    assert got == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63})
    ranked = fuse("hybrid", [("a", 9.0), ("b", 5.0), ("c", 1.0)], [("c", 0.9), ("a", 0.8), ("d", 0.1)], k=3)
    assert [i for i, _ in ranked] == ["a", "c", "b"]  # a: 1/61+1/62 > c: 1/63+1/61 > b


def test_weighted_by_hand():
    lex, dense = {"a": 10.0, "b": 5.0, "c": 0.0}, {"b": 0.9, "d": 0.5, "a": 0.1}
    got = weighted(lex, dense, 0.25)  # minmax: lex a 1, b .5, c 0; dense b 1, d .5, a 0
    assert got == pytest.approx({"a": 0.75, "b": 0.75 * 0.5 + 0.25, "c": 0.0, "d": 0.125})


def test_top_k_order_and_ties():
    assert top_k(np.array([0.1, 0.5, 0.5, 0.9]), 3) == [3, 1, 2]
    assert top_k(np.array([1.0]), 5) == [0]


def test_squad_metrics_and_loader(shared_data):
    from llmkit.rag.squad import em_f1, load_squad, token_f1

    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)  # "cat sat" vs "cat sat down"
    assert em_f1("Denver Broncos!", ["the denver broncos", "Broncos"]) == (1.0, 1.0)
    assert em_f1("nothing", ["Broncos"]) == (0.0, 0.0)
    docs, qs = load_squad(shared_data / "rag" / "squad_expmrc_dev.json")
    assert (len(docs), len(qs)) == (319, 501) and all(q.answers for q in qs)
    assert {q.doc_id for q in qs} <= {d.doc_id for d in docs}
