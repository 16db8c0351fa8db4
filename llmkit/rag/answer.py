"""The answer step: retrieved chunks -> a prompt within the model's context -> an answer citing them.

The prompt numbers the chunks [1], [2], ... in rank order and asks for citations by number; chunks are
added best first while prompt + `max_new_tokens` fit the model's context window (a chunk that does not
fit is skipped, the next smaller one may still fit). When the best chunk's cosine similarity to the
question is below `min_score`, nothing relevant was found and the answer is "I don't know" without
calling the model (the dense score is used because BM25 and RRF scores have no absolute scale).
A question that alone does not fit the context is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LLMKitError
from .retrieval import Hit

IDK = "I don't know."
SYSTEM = ("Answer the question using only the numbered passages. Be brief. Cite the passages you use "
          "by number, like [1]. If the passages do not contain the answer, reply \"I don't know\".")


@dataclass
class Answer:
    text: str
    hits: list[Hit]  # the chunks put into the prompt, numbered from 1
    cited: list[int] = field(default_factory=list)  # the numbers the answer cites
    known: bool = True


def _messages(question: str, hits: list[Hit]) -> list[dict]:
    ctx = "\n\n".join(f"[{i}] ({h.source})\n{h.text}" for i, h in enumerate(hits, 1))
    user = f"Passages:\n{ctx}\n\nQuestion: {question}" if hits else f"Question: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def closed_book_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": "Answer the question briefly."}, {"role": "user", "content": question}]


def build_prompt(question: str, hits: list[Hit], tokenizer, context: int, max_new_tokens: int) -> tuple[list[int], list[Hit]]:
    """-> (prompt ids, the hits that fit), greedily best first within `context - max_new_tokens` tokens."""
    budget = context - max_new_tokens

    def ids(hs):
        return tokenizer.encode(tokenizer.apply_chat_template(_messages(question, hs), add_generation_prompt=True))

    base = ids([])
    if len(base) > budget:
        raise LLMKitError(f"the question takes {len(base)} tokens of the prompt, more than the {budget} the model's "
                          f"context of {context} leaves after {max_new_tokens} new tokens")
    used: list[Hit] = []
    for h in hits:
        if len(ids(used + [h])) <= budget:
            used.append(h)
    return ids(used), used


def cited_numbers(text: str, n: int) -> list[int]:
    return sorted({int(m) for m in re.findall(r"\[(\d+)\]", text) if 1 <= int(m) <= n})


def answer(question: str, index, model, tokenizer, k: int = 5, mode: str = "hybrid", min_score: float = 0.25,
           max_new_tokens: int = 128, hits: list[Hit] | None = None) -> Answer:
    from ..inference import SamplingParams, generate

    hits = index.search(question, k, mode) if hits is None else hits
    best = max((h.meta.get("cosine", -1.0) for h in hits), default=-1.0)
    if mode == "bm25" and hits and "cosine" not in hits[0].meta:
        best = float("inf")  # no dense score to judge by: BM25 found term matches, trust them
    if not hits or best < min_score:
        return Answer(IDK, [], [], known=False)
    ids, used = build_prompt(question, hits, tokenizer, model.max_tokens, max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(tokenizer.stop_ids))
    text = generate(model, ids, params, tokenizer=tokenizer).completions[0].text.strip()
    known = "i don't know" not in text.lower() and "i do not know" not in text.lower()
    return Answer(text, used, cited_numbers(text, len(used)), known)


def closed_book(question: str, model, tokenizer, max_new_tokens: int = 64) -> str:
    from ..inference import SamplingParams, generate

    ids = tokenizer.encode(tokenizer.apply_chat_template(closed_book_messages(question), add_generation_prompt=True))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(tokenizer.stop_ids))
    return generate(model, ids, params, tokenizer=tokenizer).completions[0].text.strip()
