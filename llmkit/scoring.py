"""Scoring text under a model: per-token log-probabilities, NLL, perplexity, bits per byte.

`token_logprobs` scores one long text without gradients, with a sliding window over texts longer than
the context; it is built on `llmkit.losses.sequence_logprobs`, the one batched log-prob gathering
function (with gradients, for alignment and distillation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LLMKitError
from .losses import gather_logprobs, sequence_logprobs  # noqa: F401  (gather_logprobs: re-exported)


@torch.inference_mode()
def token_logprobs(model, ids: torch.Tensor | list[int], context: int | None = None, stride: int | None = None,
                   progress: bool = False) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..N-1 -> (N-1,) fp32.

    If N exceeds the context C, windows of C tokens start every `stride` tokens (default C/2) and
    each token is scored once, by the window that gives it the most left context (as in HF's
    perplexity guide); with stride = C each window starts at the last token the one before scored
    (they overlap by that one token, which every later window needs as its first context).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise LLMKitError("need at least 2 tokens to score")
    device = next(model.parameters()).device
    C = context or model.max_tokens  # tokens per window (a model prefix, if any, takes its own positions)
    if stride is not None and not 0 < stride <= C:
        raise LLMKitError(f"stride must be in 1..{C}, got {stride}")
    if n <= C:
        x = ids[None].to(device)
        return sequence_logprobs(model, x[:, :-1], x[:, 1:])[0].cpu()
    stride = max(1, C // 2) if stride is None else stride
    # window starts: every `stride` tokens, but never past the token before the first unscored one (with
    # stride = C a window starting at the next unscored token could not predict it: it would be left out)
    starts, scored, start = [], 1, 0
    while scored < n:
        start = min(start, scored - 1)
        starts.append(start)
        scored = min(start + C, n)
        start += stride
    out = torch.empty(n - 1)
    scored = 1  # tokens [1, scored) have log-probs
    it = starts
    if progress:
        from .progress import progress_bar

        it = progress_bar(iterable=starts, desc="scoring", unit="window")
    for start in it:
        end = min(start + C, n)
        window = ids[start:end][None].to(device)
        lp = sequence_logprobs(model, window[:, :-1], window[:, 1:])[0]  # predicts start+1..end-1
        out[scored - 1:end - 1] = lp[scored - start - 1:].cpu()
        scored = end
    return out


@dataclass
class TextScore:
    tokens: list[int]
    logprobs: list[float]
    nll: float  # total negative log-likelihood of tokens[1:], nats
    perplexity: float  # exp(mean nll per scored token)
    bits_per_byte: float  # nll / ln 2 / UTF-8 bytes of the scored text

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "logprobs": self.logprobs, "nll": self.nll, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def score_text(model, tokenizer, text: str, stride: int | None = None, progress: bool = False) -> TextScore:
    """Score `text`: every token after the first is predicted from all before it."""
    if not text or not text.strip():
        raise LLMKitError("empty text: nothing to score")
    from .text import clean

    text = clean(text, "the text to score")  # lone surrogates (bad bytes from argv) -> U+FFFD
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise LLMKitError("text is a single token: need at least 2 tokens to score")
    lp = token_logprobs(model, ids, stride=stride, progress=progress)
    nll = float(-lp.double().sum())
    first = tokenizer.decode(ids[:1], skip_special_tokens=True)
    n_bytes = max(1, len(text.encode("utf-8")) - len(first.encode("utf-8")))
    return TextScore(tokens=list(ids), logprobs=lp.tolist(), nll=nll, perplexity=math.exp(nll / lp.numel()),
                     bits_per_byte=nll / math.log(2) / n_bytes)
