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
