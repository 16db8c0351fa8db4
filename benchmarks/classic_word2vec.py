"""llmkit's word2vec against gensim's on the same corpus with the same settings.

    python benchmarks/classic_word2vec.py [--out benchmarks/results/classic/word2vec.json]

Corpus: the speedrun's training split of the packaged tinyshakespeare (the first 90% of the bytes),
lower-cased words. Settings (both): dim 100, window 5, 5 negatives, min_count 5, sample 1e-3, 5 epochs,
alpha 0.025 -> 1e-4, one worker. For skip-gram and CBOW it reports
  - analogy accuracy (3CosAdd) on every a:b::c:d built from 15 gendered word pairs of the plays;
  - neighbour agreement: mean overlap of the 10 nearest neighbours of the 200 most frequent words
    between llmkit and gensim, beside the same overlap between two gensim runs that differ only in
    the seed (how much two correct implementations agree at all on a corpus this small);
  - training time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time

PAIRS = [("king", "queen"), ("lord", "lady"), ("father", "mother"), ("son", "daughter"), ("brother", "sister"),
         ("husband", "wife"), ("man", "woman"), ("he", "she"), ("his", "her"), ("him", "her"), ("sir", "madam"),
         ("uncle", "aunt"), ("boy", "girl"), ("prince", "princess"), ("duke", "duchess")]


class _Gensim:
    """gensim's model behind the same two queries."""

    def __init__(self, kv):
        self.kv = kv

    def most_similar(self, w, k=10):
        return self.kv.most_similar(w, topn=k)

    def analogy(self, a, b, c):
        if any(w not in self.kv for w in (a, b, c)):
            return None
        return self.kv.most_similar(positive=[b, c], negative=[a], topn=1)[0][0]


def analogy_accuracy(model) -> tuple[float, int]:
    qs = [(a, b, c, d) for (a, b), (c, d) in itertools.permutations(PAIRS, 2) if len({a, b, c, d}) == 4]
    hits = answered = 0
    for a, b, c, d in qs:
        got = model.analogy(a, b, c)
        if got is None:
            continue
        answered += 1
        hits += got == d
    return hits / max(1, answered), answered


def overlap(m1, m2, queries, k=10) -> float:
    return sum(len({w for w, _ in m1.most_similar(q, k)} & {w for w, _ in m2.most_similar(q, k)}) / k
               for q in queries) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/classic/word2vec.json")
    args = ap.parse_args()
    import gensim
    import torch
    from gensim.models import Word2Vec as GWord2Vec

    from llmkit.classic.word2vec import Word2Vec, Word2VecConfig, words
    from llmkit.recipes.speedrun import SpeedrunConfig, corpus_path, split_bytes

    torch.set_num_threads(1)
    train, _ = split_bytes(corpus_path(SpeedrunConfig()).read_bytes(), 0.1)
    corpus = words(train)
    sentences = [corpus[i:i + 1000] for i in range(0, len(corpus), 1000)]  # gensim caps sentences at 10k words
    rows = []
    for sg in (True, False):
        cfg = Word2VecConfig(sg=sg)
        t0 = time.perf_counter()
        ours = Word2Vec(cfg).fit(corpus)
        t_ours = time.perf_counter() - t0
        g = []
        for seed in (1, 2):
            t0 = time.perf_counter()
            gm = GWord2Vec(sentences, sg=int(sg), vector_size=cfg.dim, window=cfg.window, negative=cfg.negative,
                           min_count=cfg.min_count, sample=cfg.sample, epochs=cfg.epochs, alpha=cfg.alpha,
                           min_alpha=cfg.min_alpha, workers=1, seed=seed, cbow_mean=1, hs=0)
            g.append((_Gensim(gm.wv), time.perf_counter() - t0))
        queries = [w for w in ours.vocab[:200] if w in g[0][0].kv]
        acc_ours, n_q = analogy_accuracy(ours)
        row = {"method": "skip-gram" if sg else "CBOW", "vocab": len(ours.vocab), "gensim_vocab": len(g[0][0].kv),
               "analogy_questions": n_q, "analogy_llmkit": acc_ours,
               "analogy_gensim_seed1": analogy_accuracy(g[0][0])[0], "analogy_gensim_seed2": analogy_accuracy(g[1][0])[0],
               "overlap10_llmkit_vs_gensim": overlap(ours, g[0][0], queries),
               "overlap10_gensim_seed1_vs_seed2": overlap(g[0][0], g[1][0], queries),
               "train_s_llmkit": t_ours, "train_s_gensim": g[0][1],
               "neighbours_love_llmkit": [w for w, _ in ours.most_similar("love", 5)],
               "neighbours_love_gensim": [w for w, _ in g[0][0].most_similar("love", 5)]}
        print(json.dumps(row))
        rows.append(row)
    meta = {"cpu": platform.processor() or platform.machine(), "gensim": gensim.__version__, "torch": torch.__version__,
            "words": len(corpus)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
