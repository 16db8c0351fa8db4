"""Indexes: SQLite persistence, incremental update/delete, transactions, refusing another embedding model,
the same behaviour on PostgreSQL + pgvector (a server the test starts with `pgserver`); loaders' bad input;
the answer step's budget and "I don't know"."""

import numpy as np
import pytest

from _rag_toys import ToyEmbedder
from llmkit.errors import LLMKitError
from llmkit.rag.index import ChunkSettings
from llmkit.rag.loaders import Document, load_file, load_folder
from llmkit.rag.retrieval import BM25, terms
from llmkit.rag.store import SQLiteIndex
from llmkit.rag.vectors import have_faiss

DOCS = [Document("cats.txt", "Cats are small carnivorous mammals. They purr and sleep a lot.", "cats.txt"),
        Document("paris.md", "Paris is the capital of France. It lies on the Seine.", "paris.md"),
        Document("dogs.txt", "Dogs are loyal mammals. Dogs bark at cats.", "dogs.txt"),
        Document("fox.html", "The quick brown fox jumps over the lazy dog.", "fox.html")]
SMALL = ChunkSettings("sentence", 200, 0)  # one chunk per document


def check_index(make):
    """The behaviour every backend shares; `make(create)` opens a fresh or the existing index."""
    emb = ToyEmbedder()
    idx = make(True)
    assert idx.add(DOCS) == {"added": 4, "updated": 0, "unchanged": 0, "chunks": 4}
    # BM25 equals the in-memory reference (itself equal to rank-bm25) over the same chunks
    ref = BM25([terms(d.text) for d in DOCS])
    for q in ["cats mammals", "capital of France", "dogs bark", "the lazy fox"]:
        want = dict(zip([d.doc_id for d in DOCS], ref.scores(terms(q))))
        holding = {d.doc_id for d in DOCS if set(terms(q)) & set(terms(d.text))}
        got = idx.search(q, 4, "bm25")
        assert {h.doc_id for h in got} == holding  # every chunk holding a query term, nothing else
        for h in got:
            assert h.score == pytest.approx(want[h.doc_id], abs=1e-12)
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
    hit = idx.search("capital of France", 1, "dense")[0]
    assert hit.doc_id == "paris.md" and hit.source == "paris.md" and hit.score == pytest.approx(
        float(emb.embed([DOCS[1].text])[0] @ emb.embed(["capital of France"])[0]), abs=1e-5)
    assert idx.search("Paris France capital", 2, "hybrid")[0].doc_id == "paris.md"
    idx.close()
    # reopened: same content; unchanged docs skipped, changed replaced, deletions stick
    idx = make(False)
    assert idx.doc_ids() == sorted(d.doc_id for d in DOCS)
    changed = Document("paris.md", "Berlin is the capital of Germany.", "paris.md")
    assert idx.add(DOCS[:1] + [changed]) == {"added": 0, "updated": 1, "unchanged": 1, "chunks": 1}
    assert idx.search("Germany", 1, "bm25")[0].doc_id == "paris.md"
    assert idx.search("Seine", 3, "bm25") == []
    assert idx.delete("dogs.txt") == 1 and idx.delete("nope") == 0
    assert "dogs.txt" not in {h.doc_id for h in idx.search("dogs bark", 4, "hybrid")}
    # a failing write rolls back as a whole
    bad = Document("new.txt", "Fresh text here.", "new.txt")
    orig = idx._write_doc
    idx._write_doc = lambda d, *a: (_ for _ in ()).throw(RuntimeError("disk full")) if d.doc_id == "zzz" else orig(d, *a)
    with pytest.raises(RuntimeError):
        idx.add([bad, Document("zzz", "boom", "zzz")])
    idx._write_doc = orig
    assert "new.txt" not in idx.doc_ids()
    idx.close()


VECTORS = ["numpy", pytest.param("faiss", marks=pytest.mark.skipif(not have_faiss(), reason="faiss-cpu not installed"))]


@pytest.mark.parametrize("vectors", VECTORS)
def test_sqlite_index(tmp_path, vectors):
    path = tmp_path / "idx.sqlite"
    emb = ToyEmbedder()
    check_index(lambda create: SQLiteIndex(path, emb, SMALL, create=create, vectors=vectors))
    assert (tmp_path / "idx.sqlite.faiss").is_file() == (vectors == "faiss")
    with pytest.raises(LLMKitError, match="built with embedding model toy:64.*other:64"):
        SQLiteIndex(path, ToyEmbedder(name="other"))
    with pytest.raises(LLMKitError, match="does not exist"):
        SQLiteIndex(tmp_path / "none.sqlite", emb)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(LLMKitError, match="not an llmkit index"):
        SQLiteIndex(tmp_path / "junk.sqlite", emb)


@pytest.mark.skipif(not have_faiss(), reason="faiss-cpu not installed")
def test_faiss_equals_brute_force_through_writes_and_reopens(tmp_path):
    """The FAISS index beside the file ranks exactly as numpy brute force, after adds, updates and deletes,
    across reopening, and after another (numpy-only) writer made the FAISS file stale."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [Document(f"d{i}", " ".join(rng.choice(words, 12)), f"d{i}") for i in range(60)]
    queries = [" ".join(rng.choice(words, 3)) for _ in range(10)]
    path, emb = tmp_path / "v.sqlite", ToyEmbedder()

    def same(fa, nu):
        for q in queries:
            a, b = fa.search(q, 7, "dense"), nu.search(q, 7, "dense")
            assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)

    fa = SQLiteIndex(path, emb, SMALL, create=True, vectors="faiss")
    fa.add(docs[:40])
    nu = SQLiteIndex(path, emb, vectors="numpy")
    same(fa, nu)
    fa.add([Document("d3", "w1 w2 w3 w4", "d3")] + docs[40:])  # update + add, applied in place
    fa.delete(["d5", "d7"])
    same(fa, nu)  # nu sees fa's writes (generation changed) and reloads
    fa.close()
    nu.add([Document("d9", "w5 w5 w6", "d9")])  # a writer without faiss: the .faiss file is now stale
    nu.delete("d11")
    fa = SQLiteIndex(path, emb, vectors="faiss")
    same(fa, nu)
    assert fa._vec.index.ntotal == nu.stats()["chunks"]
    fa.close()
    nu.close()
    (tmp_path / "v.sqlite.faiss").write_bytes(b"junk")  # an unreadable file is rebuilt, not trusted
    fa, nu = SQLiteIndex(path, emb, vectors="faiss"), SQLiteIndex(path, emb, vectors="numpy")
    same(fa, nu)
    fa.close()
    nu.close()
    path.unlink()  # a new database at the same path, written once (= the old file's write count) without faiss
    nu = SQLiteIndex(path, emb, SMALL, create=True, vectors="numpy")
    nu.add(docs[:5])
    fa = SQLiteIndex(path, emb, vectors="faiss")
    assert fa._vec.index.ntotal == 5  # the old PATH.faiss belongs to another database: not used
    same(fa, nu)
    with pytest.raises(LLMKitError, match="unknown vector backend"):
        SQLiteIndex(path, emb, vectors="annoy")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    try:
        import pgserver
        import psycopg  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pgvector backend not testable: {e.name} is not installed (pip install 'llmkit[rag]')")
    try:
        srv = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
        srv.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    except Exception as e:  # no shared memory, no permission to run postgres as this user, ...
        pytest.skip(f"could not start PostgreSQL + pgvector from pgserver: {e}")
    yield srv.get_uri()
    srv.cleanup()


def test_pgvector_index(postgres):
    from llmkit.rag.pgvector import PgVectorIndex

    emb = ToyEmbedder()
    check_index(lambda create: PgVectorIndex(postgres, emb, SMALL, create=create, prefix="t1"))
    with pytest.raises(LLMKitError, match="built with embedding model"):
        PgVectorIndex(postgres, ToyEmbedder(name="other"), prefix="t1")
    with pytest.raises(LLMKitError, match="no llmkit index"):
        PgVectorIndex(postgres, emb, prefix="t2")


def test_loaders(tmp_path):
    (tmp_path / "a.html").write_text("<html><head><title>Hi</title><style>p{color:red}</style>"
                                     "<script>alert(1)</script></head><body><p>One &amp; two</p><p>Three</p></body></html>")
    (tmp_path / "b.md").write_text("# Title\n\nbody")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    docs = load_folder(tmp_path)
    assert [d.doc_id for d in docs] == ["a.html", "b.md"]
    assert docs[0].text == "Hi\n\nOne & two\n\nThree" and docs[0].meta["title"] == "Hi"
    assert "alert" not in docs[0].text and "color" not in docs[0].text and docs[1].source.endswith("b.md")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMKitError, match="holds no"):
        load_folder(empty)
    with pytest.raises(LLMKitError, match="does not exist"):
        load_folder(tmp_path / "missing")


def test_corrupt_pdf(tmp_path):
    pytest.importorskip("pypdf")
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage\n")
    with pytest.raises(LLMKitError, match=r"broken\.pdf is not a readable PDF") as e:
        load_file(bad)
    assert "\n" not in str(e.value)


class _ChatTok:
    """Word tokenizer with a trivial chat template, for the prompt budget."""

    def encode(self, text):
        return text.split()

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages)


def test_answer_budget_and_idk(tmp_path):
    from llmkit.rag.answer import IDK, answer, build_prompt, cited_numbers
    from llmkit.rag.retrieval import Hit

    hits = [Hit(f"c{i}", f"d{i}", " ".join(["w"] * n), f"s{i}", 1.0) for i, n in enumerate([30, 80, 10])]
    ids, used = build_prompt("what is it", hits, _ChatTok(), context=150, max_new_tokens=50)
    assert [h.chunk_id for h in used] == ["c0", "c2"] and len(ids) <= 100  # c1 does not fit, c2 still does
    with pytest.raises(LLMKitError, match="question takes"):
        build_prompt("word " * 200, hits, _ChatTok(), context=150, max_new_tokens=50)
    assert cited_numbers("Paris [1], see also [3] and [9]", 3) == [1, 3]
    idx = SQLiteIndex(tmp_path / "i.sqlite", ToyEmbedder(), SMALL, create=True)
    idx.add(DOCS)
    a = answer("zebra quantum", idx, model=None, tokenizer=None, mode="dense", min_score=0.5)
    assert a.text == IDK and not a.known and a.hits == []
