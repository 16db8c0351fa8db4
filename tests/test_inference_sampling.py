"""Decoding strategies equal transformers' logits processors on the same logits; seeds reproduce."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.inference import sampling as S
from llmkit.inference.sampling import History, SamplingParams, make_generator, process_logits, sample

tlp = pytest.importorskip("transformers.generation.logits_process")


def _logits(B=4, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    x[0, :5] = 10.0  # ties at the top
    x[1] = x[1].sort(descending=True).values  # sorted row
    return x


def _same(a, b):
    """Equal masks of -inf and equal finite values."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = ~torch.isinf(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature(t):
    x = _logits()
    _same(S.temperature(x, t), tlp.TemperatureLogitsWarper(t)(None, x.clone()))


@pytest.mark.parametrize("k", [1, 3, 5, 20, 64, 100])
def test_top_k(k):
    x = _logits()
    _same(S.top_k(x, k), tlp.TopKLogitsWarper(k)(None, x.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p(p):
    x = _logits()
    _same(S.top_p(x, p), tlp.TopPLogitsWarper(p)(None, x.clone()))


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9])
def test_min_p(p):
    x = _logits()
    _same(S.min_p(x, p), tlp.MinPLogitsWarper(p)(None, x.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty(penalty):
    x = _logits()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(4, 64, dtype=torch.bool)
    seen[torch.arange(4)[:, None], ids] = True
    _same(S.repetition_penalty(x, seen, penalty), tlp.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()))


def test_frequency_presence_penalty_formula():
    x = _logits()
    out = [[1, 1, 1, 2], [3], [], [5, 5]]
    h = History.start([[7]] * 4, 64, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    for b, toks in enumerate(out):
        for t in toks:
            h.counts[b, t] += 1
    y = S.frequency_presence_penalty(x, h.counts, 0.5, 0.25)
    ref = x.clone()
    for b, toks in enumerate(out):  # OpenAI API: logit - count * f - [count > 0] * p
        for t in set(toks):
            ref[b, t] -= toks.count(t) * 0.5 + 0.25
    torch.testing.assert_close(y, ref)


def test_composed_pipeline_matches_transformers_order():
    x = _logits(seed=3)
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    hist = History.start(ids.tolist(), 64, p)
    ref = tlp.LogitsProcessorList([tlp.RepetitionPenaltyLogitsProcessor(1.2), tlp.TemperatureLogitsWarper(0.7),
                                   tlp.TopKLogitsWarper(20), tlp.TopPLogitsWarper(0.8), tlp.MinPLogitsWarper(0.05)])
    _same(process_logits(x, p, hist.seen, hist.counts), ref(ids, x.clone()))


def test_greedy_is_argmax_and_seed_reproduces():
    x = _logits()
    assert torch.equal(sample(x, SamplingParams()), x.argmax(-1))
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample(process_logits(x, p), p, make_generator(5))
    b = sample(process_logits(x, p), p, make_generator(5))
    assert torch.equal(a, b)
    draws = {tuple(sample(process_logits(x, p), p, make_generator(s)).tolist()) for s in range(20)}
    assert len(draws) > 1  # the seed matters


def test_sampling_follows_processed_distribution():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    p = SamplingParams(temperature=0.8, top_k=3)
    counts = torch.bincount(sample(process_logits(x, p), p, make_generator(0)), minlength=5).float()
    expected = process_logits(x[:1], p).softmax(-1)[0] * 20000
    assert counts[3:].sum() == 0
    chi2 = ((counts[:3] - expected[:3]) ** 2 / expected[:3]).sum()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-1), "top_k must be >= 0, got -1"),
    (dict(max_new_tokens=-3), "max_new_tokens must be >= 0, got -3"),
    (dict(min_p=2.0), "min_p must be in [0, 1], got 2.0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
    (dict(n=0), "n must be >= 1, got 0"),
])
def test_bad_params(kw, needle):
    with pytest.raises(LLMKitError) as e:
        SamplingParams(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
