"""word2vec (Mikolov et al. 2013): skip-gram with negative sampling and CBOW, in a few tensor ops.

  skip-gram  each word predicts the words around it:   -log σ(u_o · v_c) - Σ_k log σ(-u_k · v_c)
  CBOW       the mean of the context predicts the word:  v_c := mean of the context's input vectors
  v = input ("syn0") vectors, the embeddings kept; u = output ("syn1neg") vectors; the k negatives are
  drawn from the unigram distribution raised to 3/4 ("Distributed Representations of Words and
  Phrases", sec. 2.2).

As the original C tool and gensim do: frequent words are subsampled (kept with probability
(√(f / (s·N)) + 1) · s·N / f for a word seen f times of N), each centre word draws its window size
uniformly from 1..window (nearer words count more), the learning rate falls linearly from `alpha` to
`min_alpha` over the run, and the loss is summed over the pairs of a batch (SGD on each pair, batched).

Quality is compared with gensim trained on the same corpus with the same settings in
benchmarks/classic_word2vec.py (BENCHMARKS.md).

Shapes: P pairs in a batch, K negatives, D embedding width, V vocabulary.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LLMKitError

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words (letters with inner apostrophes); punctuation and digits dropped."""
    return _WORD.findall(text.lower())


@dataclass
class Word2VecConfig:
    sg: bool = True  # skip-gram (True) or CBOW (False)
    dim: int = 100
    window: int = 5
    negative: int = 5
    min_count: int = 5
    sample: float = 1e-3  # subsampling threshold s
    epochs: int = 5
    alpha: float = 0.025  # gensim's default for both (the C tool uses 0.05 for CBOW)
    min_alpha: float = 1e-4
    batch_pairs: int = 1024
    seed: int = 1


class Word2Vec:
    """Train with `Word2Vec(cfg).fit(list_of_words)`; then `.vectors` (V, D), `.vocab`, `.most_similar`."""

    def __init__(self, cfg: Word2VecConfig | None = None):
        self.cfg = cfg or Word2VecConfig()
        if self.cfg.dim < 1 or self.cfg.window < 1 or self.cfg.negative < 1 or self.cfg.epochs < 1:
            raise LLMKitError("word2vec dim, window, negative and epochs must each be >= 1")

    def fit(self, corpus: list[str]) -> "Word2Vec":
        c = self.cfg
        counts = Counter(corpus)
        self.vocab = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= c.min_count]
        if len(self.vocab) < 2:
            raise LLMKitError(f"fewer than 2 words occur at least min_count={c.min_count} times")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        freq = np.array([counts[w] for w in self.vocab], dtype=np.float64)
        ids = np.array([self.index[w] for w in corpus if w in self.index], dtype=np.int64)
        rng = np.random.default_rng(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        # keep probability per word (gensim's formula); noise distribution ∝ f^0.75
        thresh = c.sample * freq.sum()
        keep_p = np.minimum(1.0, (np.sqrt(freq / thresh) + 1) * thresh / freq) if c.sample > 0 else np.ones_like(freq)
        noise = torch.tensor(freq ** 0.75 / (freq ** 0.75).sum())
        V, D = len(self.vocab), c.dim
        self.v = ((torch.rand(V, D, generator=gen) - 0.5) / D).requires_grad_()  # syn0, as gensim initialises
        self.u = torch.zeros(V, D, requires_grad=True)  # syn1neg
        total_words, done = c.epochs * len(ids), 0
        for _ in range(c.epochs):
            kept = ids[rng.random(len(ids)) < keep_p[ids]]
            centers, contexts = self._pairs(kept, rng)  # skip-gram: (P,), (P,); CBOW: (P,), (P, 2W) padded -1
            order = rng.permutation(len(centers))
            for s in range(0, len(order), c.batch_pairs):
                b = torch.from_numpy(order[s:s + c.batch_pairs])
                lr = c.alpha - (c.alpha - c.min_alpha) * (done + s / max(1, len(order)) * len(ids)) / total_words
                self._step(torch.from_numpy(centers)[b], torch.from_numpy(contexts)[b], noise, gen, max(lr, c.min_alpha))
            done += len(ids)
        self.vectors = self.v.detach()
        return self

    def _pairs(self, ids: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        W, n = self.cfg.window, len(ids)
        reduced = rng.integers(1, W + 1, size=n)  # each centre's window: 1..W
        if self.cfg.sg:
            cs, os_ = [], []
            for off in range(1, W + 1):
                for sign in (-1, 1):
                    pos = np.arange(n) + sign * off
                    ok = (pos >= 0) & (pos < n) & (reduced >= off)
                    cs.append(ids[ok])  # skip-gram predicts the context word from the centre
                    os_.append(ids[pos[ok]])
            return np.concatenate(cs), np.concatenate(os_)
        ctx = np.full((n, 2 * W), -1, dtype=np.int64)
        for j, (off, sign) in enumerate((o, s) for o in range(1, W + 1) for s in (-1, 1)):
            pos = np.arange(n) + sign * off
            ok = (pos >= 0) & (pos < n) & (reduced >= off)
            ctx[ok, j] = ids[pos[ok]]
        has = (ctx >= 0).any(1)
        return ids[has], ctx[has]

    def _step(self, centers, contexts, noise, gen, lr):
        K = self.cfg.negative
        if self.cfg.sg:
            h = self.v[centers]  # (P, D): the centre's input vector
            targets = contexts  # (P,)
        else:
            mask = (contexts >= 0).float()  # (P, 2W)
            s = (self.v[contexts.clamp_min(0)] * mask[..., None]).sum(1)  # (P, D)
            # the mean goes forward, but each context word gets the whole error back, not 1/count of
            # it (word2vec.c and gensim with cbow_mean=1 do so)
            h = s.detach() / mask.sum(1, keepdim=True) + (s - s.detach())
            targets = centers
        negs = torch.multinomial(noise, targets.numel() * K, replacement=True, generator=gen).view(-1, K)  # (P, K)
        pos_score = (h * self.u[targets]).sum(-1)  # (P,)
        neg_score = torch.einsum("pd,pkd->pk", h, self.u[negs])  # (P, K)
        loss = -(F.logsigmoid(pos_score).sum() + F.logsigmoid(-neg_score).sum())
        gv, gu = torch.autograd.grad(loss, (self.v, self.u))
        with torch.no_grad():
            self.v -= lr * gv
            self.u -= lr * gu

    # ------------------------------------------------------------------ queries
    def _unit(self) -> torch.Tensor:
        return F.normalize(self.vectors, dim=-1)

    def most_similar(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        if word not in self.index:
            raise LLMKitError(f"{word!r} is not in the vocabulary ({len(self.vocab)} words of count >= "
                              f"{self.cfg.min_count})")
        unit = self._unit()
        sims = unit @ unit[self.index[word]]
        sims[self.index[word]] = -math.inf
        top = sims.topk(k)
        return [(self.vocab[i], float(s)) for s, i in zip(top.values, top.indices)]

    def analogy(self, a: str, b: str, c: str) -> str | None:
        """a : b :: c : ? by 3CosAdd (argmax cos(x, b - a + c), a, b, c excluded); None if a word is unknown."""
        if any(w not in self.index for w in (a, b, c)):
            return None
        unit = self._unit()
        q = unit[self.index[b]] - unit[self.index[a]] + unit[self.index[c]]
        sims = unit @ F.normalize(q, dim=0)
        for w in (a, b, c):
            sims[self.index[w]] = -math.inf
        return self.vocab[int(sims.argmax())]
