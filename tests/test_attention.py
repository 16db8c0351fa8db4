"""Attention masks passed as masks: packed documents and per-row positions (tiny random models)."""

import pytest
import torch

from llmkit.finetune.data import document_mask
from llmkit.models import PRESETS, ModelConfig, Transformer

TINY = [p for p in PRESETS if p.startswith("tiny-")]


@pytest.mark.parametrize("preset", TINY)
def test_document_masked_packed_forward_equals_separate_forwards(preset):
    """Documents packed in rows (positions restarting at 0, a block-diagonal causal attn_mask) give
    each document exactly the logits of its own forward; tiny-mistral's window (16) is crossed."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    m = Transformer(cfg).eval()
    rows = [[5, 30, 2], [19, 7]]  # document lengths per row, 37 and 26 tokens, padded to 40
    T = 40
    docs = [[torch.randint(0, cfg.vocab_size, (n,)) for n in r] for r in rows]
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    doc = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(docs):
        t = 0
        for d, x in enumerate(r):
            idx[b, t:t + len(x)], pos[b, t:t + len(x)], doc[b, t:t + len(x)] = x, torch.arange(len(x)), d
            t += len(x)
        doc[b, t:], pos[b, t:] = len(r), torch.arange(T - t)  # padding: one more document
    with torch.no_grad():
        packed = m(idx, input_pos=pos, attn_mask=document_mask(doc))
        for b, r in enumerate(docs):
            t = 0
            for x in r:
                alone = m(x[None])[0]
                assert (packed[b, t:t + len(x)] - alone).abs().max() < 1e-5
                t += len(x)


def manual_attention(attn, x, causal):
    """softmax(q kᵀ / sqrt(D) [+ causal -inf]) v, then o_proj, written out (Vaswani et al. 2017)."""
    B, T, _ = x.shape
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    v = v.view(B, T, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    s = q @ k.transpose(-1, -2) / D ** 0.5  # (B, H, T, T)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.softmax(s, -1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_manual_softmax(causal):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-llama", causal=causal)  # GQA: 4 query heads, 2 K/V heads
    m = Transformer(cfg).eval()
    attn = m.layers[0].self_attn
    x = torch.randn(2, 9, cfg.d_model)
    with torch.no_grad():
        got = attn(x, None, None)
        assert (got - manual_attention(attn, x, causal)).abs().max() < 1e-5
        q, k, v = attn.qkv(x)
        attn.fuse()  # one (H + 2K) D projection: the same q, k, v
        assert attn.qkv_proj is not None
        assert all((a - b).abs().max() < 1e-6 for a, b in zip(attn.qkv(x), (q, k, v)))
        assert (attn(x, None, None) - got).abs().max() < 1e-5
        # position 0 sees later tokens only without the causal mask
        ids = torch.randint(0, cfg.vocab_size, (1, 8))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
        moved = (m(ids)[0, 0] - m(changed)[0, 0]).abs().max()
    assert (moved > 1e-4) if not causal else (moved == 0)


def test_attention_registry(monkeypatch):
    from llmkit.errors import LLMKitError
    from llmkit.models import modules

    with pytest.raises(LLMKitError, match="unknown attention 'gqa2'.*did you mean 'gqa'"):
        Transformer(ModelConfig.from_preset("tiny-llama", attention="gqa2"))

    class Scaled(modules.Attention):  # a registered variant is built by every Block
        pass

    monkeypatch.setitem(modules.ATTENTIONS, "scaled", Scaled)
    m = Transformer(ModelConfig.from_preset("tiny-llama", attention="scaled"))
    assert all(type(b.self_attn) is Scaled for b in m.layers)
    with pytest.raises(LLMKitError, match="sliding window is a causal pattern"):
        ModelConfig.from_preset("tiny-mistral", causal=False)
