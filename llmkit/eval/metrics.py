"""Text metrics over a corpus of predictions and references.

Convention (as sacrebleu): `predictions` is a list of N strings and `references` a list of K
reference *streams*, each a list of N strings (K > 1 for multi-reference metrics).

Which implementation backs each metric (and what proves it):
- accuracy, precision/recall/F1 (macro and micro), exact match: written here (tests by hand).
- BLEU, chrF: sacrebleu (the standard; corpus BLEU with its defaults, 13a tokenizer), scores 0-100.
- ROUGE-1/2/L/Lsum: Google's `rouge-score` (the standard), with or without its Porter stemmer.
- METEOR: written here (Banerjee & Lavie 2005; parameters of Lavie & Agarwal 2007), equal to
  nltk's `meteor_score` with the same modules: exact, Porter stem (nltk's PorterStemmer, the one
  rouge-score also uses) and WordNet synonyms only when nltk's WordNet data is installed.
- BERTScore: bertscore.py (own BERT encoder, equal to the `bert-score` package).
All scores except BLEU/chrF are in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict

from ..errors import LLMKitError, closest


def check_lengths(predictions: list[str], references: list[list[str]], names: list[str] | None = None) -> None:
    """Every reference stream must have one line per prediction (LLMKitError naming both counts)."""
    if not references:
        raise LLMKitError("no references given")
    for k, ref in enumerate(references):
        if len(ref) != len(predictions):
            name = names[k] if names else f"reference stream {k + 1}"
            raise LLMKitError(f"predictions have {len(predictions)} lines but {name} has {len(ref)} lines")


# ---------------------------------------------------------------- classification
def accuracy(predictions: list[str], references: list[list[str]]) -> dict:
    check_lengths(predictions, references)
    ref = references[0]
    n = len(predictions)
    return {"accuracy": sum(p.strip() == r.strip() for p, r in zip(predictions, ref)) / n if n else 0.0}


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def precision_recall_f1(predictions: list[str], references: list[list[str]]) -> dict:
    """Single-label classification. Macro: unweighted mean over the labels seen in predictions or
    references (as scikit-learn, zero_division=0); micro: from summed tp/fp/fn (= accuracy here)."""
    check_lengths(predictions, references)
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references[0]]
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, r in zip(preds, refs):
        if p == r:
            tp[p] += 1
        else:
            fp[p] += 1
            fn[r] += 1
    labels = sorted(set(preds) | set(refs))
    per = [_prf(tp[c], fp[c], fn[c]) for c in labels]
    k = max(1, len(per))
    mp, mr, mf = (sum(x[i] for x in per) / k for i in range(3))
    up, ur, uf = _prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {"precision_macro": mp, "recall_macro": mr, "f1_macro": mf,
            "precision_micro": up, "recall_micro": ur, "f1_micro": uf}


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(predictions: list[str], references: list[list[str]], normalize: bool = False) -> dict:
    """Fraction of predictions equal to any of their references (stripped; SQuAD-normalised if asked)."""
    check_lengths(predictions, references)
    norm = normalize_answer if normalize else str.strip
    hits = [any(norm(p) == norm(ref[i]) for ref in references) for i, p in enumerate(predictions)]
    return {"exact_match": sum(hits) / len(hits) if hits else 0.0}


# ---------------------------------------------------------------- sacrebleu
def _sacrebleu():
    try:
        import sacrebleu
    except ImportError as e:  # optional dependency: pip install 'llmkit[eval]'
        raise LLMKitError("BLEU/chrF need sacrebleu: pip install 'llmkit[eval]'") from e
    return sacrebleu


def bleu(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU (Papineni et al. 2002) with sacrebleu's defaults (13a, exp smoothing), 0-100."""
    check_lengths(predictions, references)
    metric = _sacrebleu().BLEU()
    b = metric.corpus_score(predictions, references)
    return {"bleu": b.score, "bp": b.bp, "sys_len": b.sys_len, "ref_len": b.ref_len,
            "precisions": list(b.precisions), "signature": str(metric.get_signature())}


def chrf(predictions: list[str], references: list[list[str]]) -> dict:
    """chrF (Popović 2015), character 6-grams, beta 2, with sacrebleu's defaults, 0-100."""
    check_lengths(predictions, references)
    return {"chrf": _sacrebleu().corpus_chrf(predictions, references).score}


# ---------------------------------------------------------------- ROUGE
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def split_sentences(text: str) -> str:
    """rougeLsum scores sentence by sentence ('\\n' separated): split after . ! ? and a space."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: list[str], references: list[list[str]], use_stemmer: bool = False) -> dict:
    """ROUGE-N/L (Lin 2004) via Google's rouge-score; the corpus value is the mean of the
    per-segment scores; with several references the best one (by F) per segment, as score_multi."""
    check_lengths(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise LLMKitError("ROUGE needs rouge-score: pip install 'llmkit[eval]'") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    sums = defaultdict(float)
    for i, pred in enumerate(predictions):
        refs = [split_sentences(ref[i]) for ref in references]
        s = scorer.score_multi(refs, split_sentences(pred))
        for t in ROUGE_TYPES:
            sums[f"{t}_precision"] += s[t].precision
            sums[f"{t}_recall"] += s[t].recall
            sums[t] += s[t].fmeasure
    n = max(1, len(predictions))
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------- METEOR
def wordnet_available():
    """nltk's WordNet reader when its data is installed, else None (no download is attempted)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except Exception:
        return None


def _align(hyp: list[tuple[int, str]], ref: list[tuple[int, str]], candidates):
    """One METEOR matching stage. hyp/ref: (position, word) still unmatched. Scanning the
    hypothesis from its end, a word matches the last still-free reference word among
    `candidates(word)`. Returns (matches [(hyp_pos, ref_pos)], hyp left, ref left)."""
    free = defaultdict(list)  # word -> indices into ref, ascending
    for j, (_, w) in enumerate(ref):
        free[w].append(j)
    matches, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        best_j, best_w = -1, None
        for w in candidates(hyp[i][1]):
            pos = free.get(w)
            if pos and pos[-1] > best_j:
                best_j, best_w = pos[-1], w
        if best_w is not None:
            free[best_w].pop()
            used_h.add(i)
            used_r.add(best_j)
            matches.append((hyp[i][0], ref[best_j][0]))
    return (matches, [x for i, x in enumerate(hyp) if i not in used_h],
            [x for j, x in enumerate(ref) if j not in used_r])


def meteor_sentence(hyp: list[str], ref: list[str], stemmer=None, wordnet=None,
                    alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR of one tokenised hypothesis against one reference.

    Fmean = P·R / (α·P + (1-α)·R); penalty = γ·(chunks/matches)^β; score = (1 - penalty)·Fmean
    (Lavie & Agarwal 2007). Modules in order: exact, stem (if `stemmer`), WordNet synonym (if
    `wordnet`); each only sees the words the earlier ones left unmatched.
    """
    h = list(enumerate(w.lower() for w in hyp))
    r = list(enumerate(w.lower() for w in ref))
    if not h or not r:
        return 0.0
    matches, h, r = _align(h, r, lambda w: (w,))
    if stemmer is not None:
        hs = [(i, stemmer.stem(w)) for i, w in h]
        rs = [(j, stemmer.stem(w)) for j, w in r]
        m, hs, rs = _align(hs, rs, lambda w: (w,))
        matches += m
        # the synonym stage sees the stemmed forms of the words left, as nltk's aligner does
        h, r = hs, rs
    if wordnet is not None:
        def synonyms(w):
            names = {lem.name() for s in wordnet.synsets(w) for lem in s.lemmas() if "_" not in lem.name()}
            return names | {w}

        m, h, r = _align(h, r, synonyms)
        matches += m
    if not matches:
        return 0.0
    matches.sort(key=lambda m: m[0])
    chunks = 1 + sum(1 for a, b in zip(matches, matches[1:]) if not (b[0] == a[0] + 1 and b[1] == a[1] + 1))
    p = len(matches) / len(hyp)
    rc = len(matches) / len(ref)
    fmean = p * rc / (alpha * p + (1 - alpha) * rc)
    return (1 - gamma * (chunks / len(matches)) ** beta) * fmean


def meteor(predictions: list[str], references: list[list[str]], stem: bool = True,
           synonyms: bool | None = None) -> dict:
    """Mean sentence METEOR; whitespace tokens; best reference per segment (as nltk's meteor_score).
    synonyms=None uses WordNet when nltk's data is installed."""
    check_lengths(predictions, references)
    stemmer = None
    if stem:
        try:
            from nltk.stem.porter import PorterStemmer
        except ImportError as e:
            raise LLMKitError("METEOR's stem module needs nltk: pip install 'llmkit[eval]'") from e
        stemmer = PorterStemmer()
    wn = wordnet_available() if synonyms in (None, True) else None
    if synonyms is True and wn is None:
        raise LLMKitError("METEOR synonyms need nltk's WordNet data (python -m nltk.downloader wordnet)")
    scores = [max(meteor_sentence(p.split(), ref[i].split(), stemmer, wn) for ref in references)
              for i, p in enumerate(predictions)]
    return {"meteor": sum(scores) / len(scores) if scores else 0.0, "wordnet": wn is not None}


METRICS = {
    "accuracy": accuracy,
    "f1": precision_recall_f1,
    "exact_match": exact_match,
    "bleu": bleu,
    "chrf": chrf,
    "rouge": rouge,
    "meteor": meteor,
}


def compute(name: str, predictions: list[str], references: list[list[str]], **kw) -> dict:
    """Dispatch by metric name (bertscore lives in bertscore.py and is added here lazily)."""
    if name == "bertscore":
        from .bertscore import bertscore

        return bertscore(predictions, references, **kw)
    if name not in METRICS:
        names = sorted([*METRICS, "bertscore"])
        raise LLMKitError(f"unknown metric {name!r}{closest(name, names)}; known: {', '.join(names)}")
    return METRICS[name](predictions, references, **kw)
