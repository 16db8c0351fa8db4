"""llmkit's MiniLM sentence embeddings equal sentence-transformers' on the same pulled folder (1e-5),
including batching by length and truncation at max_seq_length (256)."""

import os

import numpy as np
import pytest


def test_embeddings_equal_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    from llmkit.rag.embeddings import Embedder

    texts = ["A man is eating food.", "Paris is the capital of France.", "", "short",
             "Retrieval-augmented generation conditions a language model on retrieved passages. " * 30,  # > 256 tokens
             "Ünïcödé and emoji 🙂 survive tokenisation."]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local; never reach for the hub
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, batch_size=4, normalize_embeddings=False)
    emb = Embedder(minilm_dir, batch_size=4)
    ours = emb.embed(texts)
    assert ours.shape == (len(texts), 384) and emb.max_length == 256
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # the batch composition (sorted by length, padded) does not change a text's vector
    np.testing.assert_allclose(emb.embed(texts[1:2])[0], ours[1], atol=1e-6)
