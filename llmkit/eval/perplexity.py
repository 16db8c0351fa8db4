"""Corpus perplexity and bits per byte, sliding-window for texts longer than the context.

Per text, `llmkit.scoring.token_logprobs` (the one log-prob function) scores every token after
the first; windows of `context` tokens start every `stride` tokens and each token is scored by
the window giving it the most left context (HF's "perplexity of fixed-length models").
Corpus values pool the texts: ppl = exp(Σ nll / Σ tokens), bpb = Σ nll / ln 2 / Σ bytes, where
the bytes are those of the scored part (the text minus its first token).
"""

from __future__ import annotations

import math

from ..errors import LLMKitError
from ..scoring import token_logprobs


def perplexity(model, tokenizer, texts: list[str], context: int | None = None, stride: int | None = None,
               progress: bool = False) -> dict:
    C = context or model.max_tokens  # the context window less the model's prefix, if any
    if C > model.max_tokens:
        raise LLMKitError(f"--context {C} is longer than the model's context window of {model.max_tokens}")
    if stride is not None and not 0 < stride <= C:
        raise LLMKitError(f"stride must be in 1..{C}, got {stride}")
    nll, n_tok, n_bytes, used = 0.0, 0, 0, 0
    it = texts
    if progress:
        from ..progress import progress_bar

        it = progress_bar(iterable=texts, desc="perplexity", unit="text")
    for text in it:
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            continue  # nothing to predict
        lp = token_logprobs(model, ids, context=C, stride=stride)
        nll += float(-lp.double().sum())
        n_tok += lp.numel()
        first = tokenizer.decode(ids[:1], skip_special_tokens=True)
        n_bytes += max(1, len(text.encode("utf-8")) - len(first.encode("utf-8")))
        used += 1
    if n_tok == 0:
        raise LLMKitError("no text with at least 2 tokens to score")
    return {"perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes, "nll": nll,
            "tokens": n_tok, "bytes": n_bytes, "texts": used, "context": C, "stride": stride}
