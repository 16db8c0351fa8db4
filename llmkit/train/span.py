"""T5's span-corruption objective (Raffel et al. 2020, sec. 3.1.4 and 3.3.4): drop ~15% of the tokens in
spans of mean length 3, replace each span in the encoder input by a sentinel, and ask the decoder for
the dropped spans, each after its sentinel:

    original  The  cute dog  walks in  the park
    input     The  <X>       walks in  <Y>  park
    target    <X>  cute dog  <Y>  the

`noise_mask` is `random_spans_noise_mask` of the T5 code (t5.data.preprocessors): the number of noise
tokens is round(length · density), split into round(noise / mean_span) spans; noise and kept tokens are
each cut into that many non-empty segments uniformly at random and interleaved, kept first, so every
sequence starts with kept tokens and ends inside a span. `span_batch` turns rows of a pretraining
batch into encoder inputs, teacher-forcing decoder inputs and targets for `train.loop.seq2seq_loss`.
"""

from __future__ import annotations

import torch

from ..errors import LLMKitError


def _segments(n_items: int, n_segments: int, gen: torch.Generator | None) -> torch.Tensor:
    """A uniformly random split of n_items into n_segments non-empty parts: their lengths (n_segments,)."""
    first = torch.zeros(n_items, dtype=torch.long)
    cuts = torch.randperm(n_items - 1, generator=gen)[:n_segments - 1] + 1  # segment starts after the first
    first[cuts] = 1
    return torch.bincount(torch.cumsum(first, 0), minlength=n_segments)


def span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens, as T5 computes them."""
    if length < 2:
        raise LLMKitError(f"span corruption needs sequences of at least 2 tokens, got {length}")
    if not 0 < noise_density < 1 or mean_span < 1:
        raise LLMKitError(f"noise_density must be in (0, 1) and mean_span >= 1, got {noise_density}, {mean_span}")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span), 1), n_noise, length - n_noise)
    return n_noise, n_spans


def noise_mask(length: int, noise_density: float = 0.15, mean_span: float = 3.0,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """(length,) bool, True at the tokens to drop (T5's random_spans_noise_mask)."""
    n_noise, n_spans = span_counts(length, noise_density, mean_span)
    noise = _segments(n_noise, n_spans, gen)
    keep = _segments(length - n_noise, n_spans, gen)
    spans = torch.stack([keep, noise], 1).reshape(-1)  # kept_0, noise_0, kept_1, noise_1, ...
    flags = torch.arange(2 * n_spans) % 2 == 1
    return flags.repeat_interleave(spans)


def span_corrupt(ids, noise_density: float = 0.15, mean_span: float = 3.0, sentinel_ids=(), gen=None):
    """ids (T,) -> (encoder input, decoder target), 1-D LongTensors: the i-th noise span becomes
    sentinel_ids[i] in the input, and the target is sentinel_ids[i] followed by span i, for each span."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    mask = noise_mask(ids.numel(), noise_density, mean_span, gen)
    starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])  # first token of each noise span
    n = int(starts.sum())
    if n > len(sentinel_ids):
        raise LLMKitError(f"{n} noise spans need {n} sentinel ids, got {len(sentinel_ids)}")
    span_of = torch.cumsum(starts.long(), 0) - 1  # span index of each noise token
    sent = torch.as_tensor(list(sentinel_ids[:n]), dtype=torch.long)
    inputs = torch.where(starts, sent[span_of.clamp_min(0)], ids)[~mask | starts]
    # target: each span's tokens preceded by its sentinel (a kept token before a span start becomes it)
    kept_then_span = torch.cat([starts[1:], starts.new_zeros(1)])  # the kept token just before each span
    tgt = torch.where(kept_then_span, sent[(span_of + 1).clamp(0, max(n - 1, 0))], ids)
    targets = tgt[mask | kept_then_span]
    return inputs, targets


def span_batch(rows: torch.Tensor, sentinel_ids, start_id: int, eos_id: int | None = None,
               noise_density: float = 0.15, mean_span: float = 3.0, gen=None) -> dict:
    """rows (B, T) of token windows -> {"idx" (B, S), "decoder_ids" (B, L), "targets" (B, L)}: span
    corrupted inputs and targets (each ended by eos_id when given), decoder inputs = targets shifted
    right behind start_id (teacher forcing). Rows of equal length give equal S and L: no padding."""
    pairs = [span_corrupt(r, noise_density, mean_span, sentinel_ids, gen) for r in rows.cpu()]
    eos = [] if eos_id is None else [eos_id]
    idx = torch.stack([torch.cat([i, torch.tensor(eos, dtype=torch.long)]) for i, _ in pairs])
    targets = torch.stack([torch.cat([t, torch.tensor(eos, dtype=torch.long)]) for _, t in pairs])
    decoder_ids = torch.cat([torch.full_like(targets[:, :1], start_id), targets[:, :-1]], 1)
    dev = rows.device
    return {"idx": idx.to(dev), "decoder_ids": decoder_ids.to(dev), "targets": targets.to(dev)}
