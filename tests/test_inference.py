"""Inference engine on tiny random models: cached decoding = full forward, chunked prefill, rolling
buffer, batching, prefix caching, speculative decoding (greedy equality, chi-square), streaming."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.inference import (BatchKVCache, PrefixCache, RollingKVCache, SamplingParams, best_of_n, decode_step,
                              generate, generate_batch, prefill, speculative_accept, speculative_generate, stream,
                              truncated_draft)
from llmkit.models.config import ModelConfig
from llmkit.models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one torch thread


FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-mixtral", "tiny-qwen2"]


def tiny(name="tiny-llama", seed=0, **over):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_preset(name, **over)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: peaked, varied next-token distributions
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return m


def ids(n, seed=0, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------- cache correctness
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decoding_equals_full_forward_every_step(name):
    model = tiny(name)
    seq = torch.tensor([ids(40, 1)])  # 40 > sliding window 16 of tiny-mistral
    with torch.no_grad():
        ref = model(seq)[0]  # (T, V), the model's own (sliding-window) mask
    caches = [BatchKVCache(model.cfg, 1, 40)]
    if model.cfg.sliding_window:
        caches.append(RollingKVCache(model.cfg, 1))
    for cache in caches:
        out = [prefill(model, seq[:, :8], cache)[0]]
        for t in range(8, 40):
            out.append(decode_step(model, seq[0, t:t + 1], t, cache)[0])
        torch.testing.assert_close(torch.stack(out), ref[7:], atol=1e-4, rtol=1e-4)


def test_rolling_buffer_holds_w_entries():
    model = tiny("tiny-mistral")
    cache = RollingKVCache(model.cfg, 1)
    assert cache.k.shape[3] == model.cfg.sliding_window == 16
    prompt = ids(10, 2)
    g = generate(model, prompt, SamplingParams(max_new_tokens=30))  # 40 positions, rolling buffer in use
    assert g.tokens == full_greedy(model, prompt, 30)


@pytest.mark.parametrize("name,chunk", [("tiny-llama", 5), ("tiny-mistral", 7), ("tiny-mistral", 20)])
def test_chunked_prefill_equals_one_shot(name, chunk):
    model = tiny(name)
    seq = torch.tensor([ids(45, 3)])
    for make in ([lambda: BatchKVCache(model.cfg, 1, 46)] +
                 ([lambda: RollingKVCache(model.cfg, 1)] if model.cfg.sliding_window else [])):
        a, b = make(), make()
        la = prefill(model, seq, a)
        lb = prefill(model, seq, b, chunk_size=chunk)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=1e-5)
        nxt = la.argmax(-1)
        torch.testing.assert_close(decode_step(model, nxt, 45, a), decode_step(model, nxt, 45, b), atol=1e-5,
                                   rtol=1e-5)


# ---------------------------------------------------------------- batching, prefix cache
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-gpt2", "tiny-mixtral"])
def test_batched_equals_sequential(name):
    model = tiny(name)
    prompts = [ids(23, 4), ids(5, 5), ids(14, 6), ids(1, 7)]
    p = SamplingParams(max_new_tokens=20)
    batched = generate_batch(model, prompts, p)
    for prompt, g in zip(prompts, batched):
        assert g.tokens == generate(model, prompt, p).tokens == full_greedy(model, prompt, 20)


def test_n_samples_share_prefill_and_seed_reproduces():
    model = tiny()
    p = SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=11)
    a = generate(model, ids(9, 8), p)
    b = generate(model, ids(9, 8), p)
    assert [c.tokens for c in a.completions] == [c.tokens for c in b.completions]
    assert len({tuple(c.tokens) for c in a.completions}) > 1
    c = generate(model, ids(9, 8), SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=12))
    assert [x.tokens for x in c.completions] != [x.tokens for x in a.completions]


def test_prefix_cache_identical_results_and_hits():
    model = tiny()
    system = ids(30, 9)
    pc = PrefixCache()
    p = SamplingParams(max_new_tokens=10, logprobs=3)
    for i, q in enumerate([ids(6, 10), ids(8, 11), ids(4, 12)]):
        g = generate(model, system + q, p, prefix_cache=pc)
        ref = generate(model, system + q, p)
        assert g.tokens == ref.tokens
        torch.testing.assert_close(torch.tensor(g.completions[0].logprobs), torch.tensor(ref.completions[0].logprobs),
                                   atol=1e-4, rtol=1e-4)
        assert g.stats["prefix_hit_tokens"] == (0 if i == 0 else 30)
    assert pc.stats() == {"hits": 2, "misses": 1, "hit_tokens": 60, "entries": 3}
    with pytest.raises(LLMKitError, match="another model"):
        generate(tiny(seed=1), system, p, prefix_cache=pc)


# ---------------------------------------------------------------- strategies end to end
def test_stop_ids_max_new_tokens_logprobs():
    model = tiny()
    prompt = ids(7, 13)
    free = generate(model, prompt, SamplingParams(max_new_tokens=15, logprobs=2))
    c = free.completions[0]
    assert len(c.tokens) == 15 and c.finish_reason == "length"
    assert all(top[0][1] >= top[1][1] for top in c.top_logprobs)
    with torch.no_grad():  # log-probs are those of the model's raw distribution
        lp = torch.log_softmax(model(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1:-1], -1)
    torch.testing.assert_close(torch.tensor(c.logprobs), lp.gather(-1, torch.tensor(c.tokens)[:, None])[:, 0],
                               atol=1e-4, rtol=1e-4)
    stopped = generate(model, prompt, SamplingParams(max_new_tokens=15, stop_ids=(c.tokens[5],)))
    cut = c.tokens.index(c.tokens[5])
    assert stopped.tokens == c.tokens[:cut] and stopped.completions[0].finish_reason == "stop"
    assert generate(model, prompt, SamplingParams(max_new_tokens=0)).tokens == []


def test_penalties_change_greedy_output():
    model = tiny()
    prompt = ids(5, 14)
    plain = generate(model, prompt, SamplingParams(max_new_tokens=30)).tokens
    pen = generate(model, prompt, SamplingParams(max_new_tokens=30, frequency_penalty=5.0)).tokens
    assert len(set(pen)) >= len(set(plain)) and pen != plain


def test_best_of_n_ranks_by_score():
    model = tiny()
    p = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    g = best_of_n(model, ids(6, 15), p, 5)
    scores = [c.score for c in g.completions]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(g.completions[0].mean_logprob)
    g2 = best_of_n(model, ids(6, 15), p, 5, score_fn=lambda prompt, toks: -sum(toks))
    assert g2.completions[0].tokens == min((c.tokens for c in g2.completions), key=sum)


# ---------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
def test_speculative_greedy_equals_target_greedy(name):
    target = tiny(name)
    for draft in (truncated_draft(target, 1), tiny(name, seed=5)):
        for k in (1, 3, 5):
            g = speculative_generate(target, draft, ids(9, 16), SamplingParams(max_new_tokens=25), k=k)
            assert g.tokens == full_greedy(target, ids(9, 16), 25)
            assert 0 <= g.stats["acceptance_rate"] <= 1 and g.stats["proposed"] > 0


def test_speculative_accept_follows_target_distribution():
    """Modified rejection sampling alone, vectorised over many rows (small vocabulary)."""
    V, k, N = 6, 3, 30000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=g).T  # (N, k) draft samples
    n_acc, nxt = speculative_accept(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    first = torch.where(n_acc > 0, drafts[:, 0], nxt)  # the first emitted token
    counts = torch.bincount(first, minlength=V).double()
    expected = p[0].double() * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 dof, p = 0.001
    assert float((n_acc > 0).double().mean()) == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.01)


def test_speculative_sampling_matches_target_chi_square():
    """End to end on a tiny model with a vocabulary of 8: the joint law of the first two sampled tokens."""
    target = tiny("tiny-llama", vocab_size=8, n_layer=1, d_model=32, d_ff=64)
    draft = tiny("tiny-llama", seed=7, vocab_size=8, n_layer=1, d_model=32, d_ff=64)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
        p2 = torch.softmax(target(torch.tensor([[*prompt, t] for t in range(8)]))[:, -1], -1)
    joint = (p1[:, None] * p2).flatten().double()  # (64,)
    N = 1500
    counts = torch.zeros(64, dtype=torch.float64)
    for s in range(N):
        g = speculative_generate(target, draft, prompt, SamplingParams(temperature=1.0, max_new_tokens=2, seed=s), k=2)
        counts[g.tokens[0] * 8 + g.tokens[1]] += 1
    expected = joint * N
    keep = expected >= 5  # pool the rare cells
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    pval = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert pval > 0.001, (chi2, dof)


def test_speculative_bad_draft():
    with pytest.raises(LLMKitError, match=r"draft model's vocabulary \(128 tokens\) differs .* \(256\)"):
        speculative_generate(tiny(), tiny(vocab_size=128), ids(4), SamplingParams())


# ---------------------------------------------------------------- streaming (text edge)
@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from llmkit.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    f = d / "corpus.txt"
    f.write_text("héllo wörld, naïve café. 日本語のテキスト。 Ünïcödé 🙂🚀 emoji, Ελληνικά, русский текст.\n" * 20,
                 encoding="utf-8")
    return Tokenizer.train([f], vocab_size=300, special_tokens=["<|endoftext|>"])


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_deltas_concatenate_to_text_non_ascii(bpe):
    model = tiny(vocab_size=bpe.vocab_size)
    prompt = bpe.encode("日本語 café 🙂")
    split_chars = 0
    for seed in range(3):
        p = SamplingParams(temperature=1.0, max_new_tokens=40, seed=seed)
        deltas = list(stream(model, bpe, prompt, p))
        full = generate(model, prompt, p, tokenizer=bpe)
        assert "".join(deltas) == full.text == bpe.decode(full.tokens)
        assert any(ord(ch) > 127 for ch in full.text)
        split_chars += sum(1 for t in full.tokens if not _valid_utf8(bpe.token_bytes(t)))
    assert split_chars > 0  # some characters did arrive in pieces across byte-level tokens


def test_stop_strings_cut_text_in_generate_and_stream(bpe):
    model = tiny(vocab_size=bpe.vocab_size)
    prompt = bpe.encode("héllo")
    free = generate(model, prompt, SamplingParams(max_new_tokens=30), tokenizer=bpe).text
    stop = free[10:12]
    p = SamplingParams(max_new_tokens=30, stop=(stop,))
    g = generate(model, prompt, p, tokenizer=bpe)
    assert g.text == free[:free.index(stop)] and g.completions[0].finish_reason == "stop"
    assert "".join(stream(model, bpe, prompt, p)) == g.text


# ---------------------------------------------------------------- bad input
def test_prompt_longer_than_context():
    model = tiny()  # context window 256
    long = ids(300, 17)
    with pytest.raises(LLMKitError, match="prompt of 300 tokens .* context window of 256"):
        generate(model, long, SamplingParams(max_new_tokens=5))
    g = generate(model, long, SamplingParams(max_new_tokens=5), truncate=True)
    assert g.prompt_tokens == long[-251:] and len(g.tokens) == 5
    with pytest.raises(LLMKitError, match="empty prompt"):
        generate(model, [], SamplingParams())
    with pytest.raises(LLMKitError, match="token id 999 is outside"):
        generate(model, [1, 999], SamplingParams())


# ---------------------------------------------------------------- quantised linears (decode speed)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quant_linear_matches_dequantised_weights(mode):
    from llmkit.inference.quant import GROUP, QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    if mode == "int4":  # weights on the Q4_1 grid (s * q + m per group of 32): recovered exactly
        w = lin.weight.data.view(48, 3, GROUP)
        s, m = torch.rand(48, 3, 1) * 0.01 + 0.001, torch.randn(48, 3, 1) * 0.05
        q = torch.randint(0, 16, (48, 3, GROUP))
        q[..., 0], q[..., 1] = 0, 15
        w.copy_(q * s + m)
    ql = QuantLinear.from_linear(lin, mode)
    for rows in (1, 3, 20):  # kernel path and per-call dequantized bf16 path
        x = torch.randn(rows, 96)
        torch.testing.assert_close(ql(x), lin(x), atol=0.03, rtol=0.02)
    assert not any(b.is_floating_point() and b.numel() >= 96 * 48 for b in ql.buffers())  # no full-precision copy
    with pytest.raises(LLMKitError, match="int4 does not take.*in_features divisible by 32"):
        QuantLinear.from_linear(torch.nn.Linear(50, 8), "int4")
    with pytest.raises(LLMKitError, match="int8 does not take.*in_features divisible by 16"):
        QuantLinear.from_linear(torch.nn.Linear(172, 8), "int8")


@pytest.mark.parametrize("mode,tol", [("int8", 0.06), ("int4", 0.15)])
def test_quantized_model_close_to_fp32(mode, tol):
    """Re-quantising arbitrary fp32 weights loses a little (exact only on the Q4_1 grid, tested above)."""
    from llmkit.inference.quant import QuantLinear, quantize

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama", d_ff=176)).eval()
    seq = torch.tensor([ids(20, 18)])

    def logprobs():  # prefill (bf16 path) of 12 tokens, then 8 decode steps (weight-only kernels)
        cache = BatchKVCache(model.cfg, 1, 20)
        out = [prefill(model, seq[:, :12], cache)[0]]
        out += [decode_step(model, seq[0, t:t + 1], t, cache)[0] for t in range(12, 20)]
        return torch.log_softmax(torch.stack(out), -1)

    ref = logprobs()
    quantize(model, mode)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.method.name == "int8"
    assert model.layers[0].self_attn.q_proj.method.name == mode  # quantize does not fuse
    assert model.layers[0].mlp.down_proj.method.name == "int8"  # out_features 64 ok for int4, in_features 176 not
    err = float((logprobs() - ref).abs().max() / ref.std())
    assert err < tol


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_projections_equal_separate(name):
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj (quantize's first step) change no output."""
    from llmkit.inference.quant import fuse_projections

    model = tiny(name)
    seq = torch.tensor([ids(24, 3)])
    with torch.no_grad():
        ref = model(seq)
    fuse_projections(model)
    assert model.layers[0].self_attn.qkv_proj is not None and not hasattr(model.layers[0].self_attn, "q_proj")
    with torch.no_grad():
        torch.testing.assert_close(model(seq), ref, atol=1e-5, rtol=1e-5)
    assert generate(model, seq[0, :8].tolist(), SamplingParams(max_new_tokens=12)).tokens == \
        full_greedy(model, seq[0, :8].tolist(), 12)


def test_quantize_skips_shapes_no_kernel_takes():
    from llmkit.inference.quant import quantize

    from llmkit.quant import fuse_projections

    model = fuse_projections(quantize(tiny(), "int8"))  # d_ff=172: down_proj's in_features is not a multiple of 16
    assert type(model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.layers[0].mlp.gate_up_proj.method.name == "int8"
    g = generate(model, ids(6, 19), SamplingParams(max_new_tokens=5, logprobs=1))
    assert all(lp == lp and lp > -1e4 for lp in g.completions[0].logprobs)  # finite, no garbage reads
