"""Chunkers: token budgets, overlap, boundaries, spans that point back into the text."""

import pytest

from _rag_toys import word_tokenizer
from llmkit.errors import LLMKitError
from llmkit.rag.chunking import chunk_text, count_tokens, fixed_chunks, recursive_chunks, sentence_chunks, split_sentences

TEXT = ("Alpha beta gamma delta. Epsilon zeta eta theta iota! Kappa lambda mu?\n\n"
        "Nu xi omicron pi rho sigma tau upsilon phi chi psi omega. One two three four five six seven eight nine ten "
        "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty.\n"
        "Last line here.")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.mark.parametrize("method", ["fixed", "recursive", "sentence"])
@pytest.mark.parametrize("size", [4, 7, 12, 40])
def test_budget_and_spans(tok, method, size):
    chunks = chunk_text(TEXT, tok, method, size, min(2, size - 1))
    assert chunks
    for c in chunks:
        assert c.n_tokens == count_tokens(tok, c.text) <= size
        assert TEXT[c.start:c.end] == c.text and c.text == c.text.strip()
    # every word of the text is in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(TEXT) if not ch.isspace())


def test_fixed_overlap_exact(tok):
    words = " ".join(f"w{i}" for i in range(23))
    chunks = fixed_chunks(words, tok, size=10, overlap=3)
    ids = [c.text.split() for c in chunks]
    assert ids[0] == [f"w{i}" for i in range(10)]
    assert ids[1][:3] == ids[0][-3:] and ids[1][0] == "w7"  # step = size - overlap = 7
    assert ids[-1][-1] == "w22" and [len(x) for x in ids] == [10, 10, 9]


def test_recursive_prefers_paragraphs(tok):
    chunks = recursive_chunks(TEXT, tok, size=40)
    assert chunks[0].text.endswith("Kappa lambda mu?")  # the blank line is the first cut


def test_sentence_boundaries_and_overlap(tok):
    spans = split_sentences(TEXT)
    sents = [TEXT[s:e] for s, e in spans]
    assert sents[:3] == ["Alpha beta gamma delta.", "Epsilon zeta eta theta iota!", "Kappa lambda mu?"]
    chunks = sentence_chunks(TEXT, tok, size=16, overlap=6)
    for c in chunks:  # chunks begin at sentence starts (unless a long sentence was windowed)
        assert any(c.start == s for s, _ in spans) or count_tokens(tok, c.text) == 16 or c.start > spans[3][0]
    assert chunks[1].text.startswith("Kappa lambda mu?")  # last sentence (4 tokens <= 6) carried over


def test_bad_settings(tok):
    with pytest.raises(LLMKitError, match="overlap"):
        chunk_text(TEXT, tok, "fixed", 5, 5)
    with pytest.raises(LLMKitError, match="did you mean"):
        chunk_text(TEXT, tok, "sentenc", 5, 0)
