"""An n-gram language model over token ids: add-k (Lidstone) and interpolated Kneser-Ney smoothing.

A model of order N predicts a token from the N-1 before it:

  add-k          p(w | c) = (C(c w) + k) / (C(c) + k V)                  (Lidstone; k = 1 is Laplace)
  Kneser-Ney     p(w | c) = max(C'(c w) - d, 0) / C'(c) + d N1+(c •) / C'(c) · p(w | c[1:])
                 (Kneser & Ney 1995; interpolated as in Chen & Goodman 1998), where C' is the raw count at
                 the highest order and the *continuation* count N1+(• c w), the number of distinct tokens
                 seen before c w, at the lower ones: a token that follows many different contexts gets more
                 of the lower-order mass than one that is frequent only after one context ("Francisco").
                 A context never seen hands all its mass to the next lower order.

Both equal nltk.lm's `Lidstone` and `KneserNeyInterpolated` on the same counts (tests/test_classic.py).
nltk's unigram level is the bare continuation distribution, which gives 0 to a token that never
followed anything; `uniform_floor=True` (the default here) discounts it too and gives the freed mass
to a uniform distribution over the vocabulary, so every held-out token has a finite cost.

Counts are plain dicts keyed by context tuples: the training text of the speedrun (~0.4M tokens)
counts in seconds for N ≤ 6.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..errors import LLMKitError

SMOOTHINGS = ("kneser_ney", "add_k")


@dataclass
class NGramLM:
    order: int = 3
    vocab_size: int = 0
    smoothing: str = "kneser_ney"  # kneser_ney | add_k
    k: float = 1.0  # add-k pseudo-count
    discount: float = 0.75  # Kneser-Ney absolute discount d
    uniform_floor: bool = True  # Kneser-Ney: interpolate the unigram level with 1/V (nltk: False)
    # counts[n][context] = Counter(next token -> count): context tuples of length n - 1, n = 1..order
    counts: list = field(default_factory=list, repr=False)
    # cont[context] = Counter(w -> N1+(• context w)) for contexts of length 0..order-2
    cont: dict = field(default_factory=dict, repr=False)
    cont_total: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.order, int) or self.order < 1:
            raise LLMKitError(f"n-gram order must be an integer >= 1, got {self.order!r}")
        if self.smoothing not in SMOOTHINGS:
            raise LLMKitError(f"unknown n-gram smoothing {self.smoothing!r} (choose from {', '.join(SMOOTHINGS)})")
        if self.smoothing == "add_k" and self.k <= 0:
            raise LLMKitError(f"add-k smoothing needs k > 0, got {self.k}")
        if self.smoothing == "kneser_ney" and not 0 < self.discount < 1:
            raise LLMKitError(f"Kneser-Ney discount must be in (0, 1), got {self.discount}")

    # ------------------------------------------------------------------ counting
    def fit(self, ids: list[int]) -> "NGramLM":
        if len(ids) < self.order:
            raise LLMKitError(f"{len(ids)} training tokens are fewer than the n-gram order {self.order}")
        self.vocab_size = max(self.vocab_size, max(ids) + 1)
        self.counts = [None] + [defaultdict(Counter) for _ in range(self.order)]
        for n in range(1, self.order + 1):
            table = self.counts[n]
            for i in range(len(ids) - n + 1):
                table[tuple(ids[i:i + n - 1])][ids[i + n - 1]] += 1
        # continuation counts: each distinct n-gram (x, c, w) of order len(c) + 2 adds one to cont[c][w]
        self.cont, self.cont_total = defaultdict(Counter), Counter()
        for n in range(2, self.order + 1):
            for prefix, nexts in self.counts[n].items():
                c = prefix[1:]
                for w in nexts:
                    self.cont[c][w] += 1
                    self.cont_total[c] += 1
        self._n_types = {c: len(nexts) for n in range(1, self.order + 1) for c, nexts in self.counts[n].items()}
        self._totals = {c: sum(nexts.values()) for n in range(1, self.order + 1) for c, nexts in self.counts[n].items()}
        return self

    # ------------------------------------------------------------------ probabilities
    def prob(self, w: int, context: tuple = ()) -> float:
        """p(w | context), the context cut to its last order-1 tokens."""
        if not self.counts:
            raise LLMKitError("the n-gram model has not been fitted")
        context = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        if self.smoothing == "add_k":
            nexts = self.counts[len(context) + 1].get(context)
            c_w, c = (nexts[w], self._totals[context]) if nexts else (0, 0)
            return (c_w + self.k) / (c + self.k * self.vocab_size)
        return self._kn(w, context)

    def _kn(self, w: int, c: tuple) -> float:
        d = self.discount
        if not c:  # unigram: continuation counts N1+(• w) / N1+(• •)
            cont, total = self.cont.get(()), self.cont_total.get((), 0)
            if not total:  # order 1: plain relative frequency
                cont, total = self.counts[1][()], self._totals[()]
            if not self.uniform_floor:
                return cont[w] / total
            return max(cont[w] - d, 0.0) / total + d * len(cont) / total / self.vocab_size
        nexts = self.counts[len(c) + 1].get(c)
        if not nexts:  # context never seen: all mass to the lower order
            return self._kn(w, c[1:])
        if len(c) + 1 == self.order:  # highest order: raw counts
            c_w, total = nexts[w], self._totals[c]
        else:  # lower orders: continuation counts
            c_w, total = self.cont[c][w], self.cont_total[c]
            if not total:  # c occurs only at the very start of the text: nothing ever preceded it
                return self._kn(w, c[1:])
        alpha = max(c_w - d, 0.0) / total
        gamma = d * self._n_types[c] / total
        return alpha + gamma * self._kn(w, c[1:])

    def logprobs(self, ids: list[int]) -> list[float]:
        """ln p of every token after the first, each from up to order-1 tokens before it: (len(ids) - 1,)."""
        n = self.order - 1
        return [math.log(self.prob(ids[i], tuple(ids[max(0, i - n):i]))) for i in range(1, len(ids))]


def fit_best_order(ids: list[int], vocab_size: int, orders=range(1, 7), dev_fraction: float = 0.05,
                   **kwargs) -> tuple[NGramLM, dict]:
    """Pick the order on a dev split (the last `dev_fraction` of the training tokens, never the held-out
    text), then refit on all the training tokens. Returns (model, {order: dev bits per token})."""
    cut = int(len(ids) * (1 - dev_fraction))
    fit_ids, dev = ids[:cut], ids[cut:]
    dev_bits = {}
    for n in orders:
        lm = NGramLM(order=n, vocab_size=vocab_size, **kwargs).fit(fit_ids)
        lps = lm.logprobs(dev)
        dev_bits[n] = -sum(lps) / len(lps) / math.log(2)
    best = min(dev_bits, key=dev_bits.get)
    return NGramLM(order=best, vocab_size=vocab_size, **kwargs).fit(ids), dev_bits
