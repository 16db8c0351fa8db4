"""Small stand-ins for the RAG tests: a word-level tokenizer and a hashed bag-of-words embedder, so
the store/chunking logic is tested in milliseconds; the real MiniLM is tested in test_rag_embeddings.py."""

import hashlib

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from llmkit.rag.retrieval import terms
from llmkit.tokenizer import Tokenizer


def word_tokenizer() -> Tokenizer:
    """Every word or punctuation run is one token ([UNK] for all; only counts and offsets matter)."""
    hf = HFTokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    return Tokenizer(hf)


class ToyEmbedder:
    def __init__(self, dim: int = 64, name: str = "toy"):
        self.dim, self.identity, self.tokenizer = dim, f"{name}:{dim}", word_tokenizer()

    def embed(self, texts, progress=None):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in terms(t):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
            n = np.linalg.norm(out[i])
            out[i] /= n if n else 1
        return out
