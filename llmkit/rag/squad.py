"""`llmkit rag eval` on SQuAD-format data (Rajpurkar et al. 2016): every context paragraph is a document,
every question a query whose relevant document is its own paragraph.

Retrieval: recall@k = share of questions whose paragraph is among the first k distinct documents
ranked (chunks map back to their document), MRR = mean of 1 / rank of that paragraph (0 if not in
the ranked list). Answers: SQuAD v1.1 exact match and token F1 against any gold answer (max over golds),
with the official normalisation (eval.metrics.normalize_answer).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import LLMKitError
from ..eval.metrics import normalize_answer
from .loaders import Document


@dataclass
class Question:
    qid: str
    question: str
    doc_id: str
    answers: list[str]


def load_squad(path: str | Path) -> tuple[list[Document], list[Question]]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LLMKitError(f"{p} is not a SQuAD-format JSON file ({type(e).__name__}: {e})") from None
    docs, qs = [], []
    for article in data:
        for j, para in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}/{j}"
            docs.append(Document(doc_id, para["context"], f"{p.name}:{doc_id}", {"title": article["title"]}))
            for qa in para["qas"]:
                qs.append(Question(qa["id"], qa["question"], doc_id, [a["text"] for a in qa["answers"]]))
    if not docs or not qs:
        raise LLMKitError(f"{p} holds no paragraphs or questions")
    return docs, qs


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1 token-overlap F1 of normalised answers."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def em_f1(prediction: str, golds: list[str]) -> tuple[float, float]:
    em = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return em, max(token_f1(prediction, g) for g in golds)


def retrieval_metrics(index, questions: list[Question], mode: str, ks=(1, 5, 20), depth: int = 20,
                      progress=None) -> dict:
    hits_at = {k: 0 for k in ks}
    rr, lat = 0.0, []
    for q in questions:
        t0 = time.perf_counter()
        hits = index.search(q.question, depth * 3, mode)  # chunks; a long paragraph may fill several
        lat.append(time.perf_counter() - t0)
        docs = list(dict.fromkeys(h.doc_id for h in hits))[:depth]
        if q.doc_id in docs:
            r = docs.index(q.doc_id) + 1
            rr += 1 / r
            for k in ks:
                hits_at[k] += r <= k
        if progress is not None:
            progress.update(1)
    n = len(questions)
    out = {f"recall@{k}": hits_at[k] / n for k in ks} | {"mrr": rr / n}
    out |= {"latency_ms_median": 1000 * statistics.median(lat), "latency_ms_p95": 1000 * sorted(lat)[int(0.95 * (n - 1))]}
    return out
