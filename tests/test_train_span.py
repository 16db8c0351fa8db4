"""T5 span corruption (train/span.py): noise density and mean span length hold statistically, every
sequence starts kept and ends in a span, inputs + targets reconstruct the original, and a tiny T5
pretrained on it for a few steps lowers the loss."""

import pytest
import torch

from llmkit.train.span import noise_mask, span_batch, span_corrupt, span_counts

SENT = list(range(1000, 1100))


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    spans, cur = {}, None
    for t in targets:
        if t in SENT:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    return [x for t in inputs for x in (spans[t] if t in SENT else [t])]


def test_density_and_mean_span_length():
    gen = torch.Generator().manual_seed(0)
    noise = total = spans = 0
    for length in (100, 512, 57):
        for _ in range(100):
            m = noise_mask(length, 0.15, 3.0, gen)
            assert not m[0] and m[-1]  # T5: kept tokens first, the last span runs to the end
            noise += int(m.sum())
            total += length
            spans += int((m & ~torch.cat([m.new_zeros(1), m[:-1]])).sum())
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.15
    assert span_counts(512) == (77, 26) and span_counts(10) == (2, 1)  # T5's rounding


def test_span_lengths_are_random_and_reconstruct():
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(50):
        ids = torch.randint(0, 1000, (64,), generator=gen)
        inp, tgt = span_corrupt(ids, 0.15, 3.0, SENT, gen)
        assert reconstruct(inp.tolist(), tgt.tolist()) == ids.tolist()
        n = span_counts(64)[1]
        assert inp.tolist().count(SENT[0]) == 1 and [t for t in tgt.tolist() if t in SENT] == SENT[:n]
        assert len(inp) == 64 - span_counts(64)[0] + n and len(tgt) == span_counts(64)[0] + n
        seen.add(tuple(inp.tolist()))
    assert len(seen) == 50


def test_span_pretraining_lowers_the_loss():
    from llmkit.models.t5 import T5, T5Config
    from llmkit.train.loop import seq2seq_loss, train_step

    torch.manual_seed(0)
    model = T5(T5Config.from_preset("tiny-t5", vocab_size=64 + 8 + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    rows = (torch.arange(8)[:, None] * 3 + torch.arange(48)[None]) % 64  # a learnable pattern
    sentinels, start = list(range(64, 72)), 72
    losses = []
    for _ in range(25):
        batch = span_batch(rows, sentinels, start, eos_id=None, gen=gen)
        losses.append(train_step(model, opt, [batch], loss_fn=seq2seq_loss)["loss"])
    assert batch["idx"].shape == (8, 48 - 7 + 2) and batch["targets"].shape == (8, 7 + 2)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses


def test_pretrain_recipe_objective_span(tmp_path):
    """objective=span with a t5 preset: the recipe trains a T5 on span corruption, the loss falls, and
    the final checkpoint loads as a T5 that `generate` runs."""
    from llmkit.config import load_config
    from llmkit.errors import LLMKitError
    from llmkit.inference import SamplingParams, generate
    from llmkit.loading import load_model
    from llmkit.models.t5 import T5
    from llmkit.recipes.pretrain import PretrainConfig, pretrain
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.data import prepare
    from llmkit.train.loop import read_metrics

    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "llmkit" / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    (tmp_path / "a.txt").write_text(text)
    tok = Tokenizer.train([tmp_path / "a.txt"], 300)
    prepare([tmp_path / "a.txt"], tok, tmp_path / "d", progress=False)
    over = [f"data.dir={tmp_path / 'd'}", f"train.out_dir={tmp_path / 'run'}", "data.seq_len=32", "train.batch_size=8",
            "train.steps=30", "train.ckpt_every=0", "train.progress=false", "train.threads=1", "objective=span",
            "preset=tiny-t5", "optim.lr=3e-3", "optim.warmup_steps=2"]
    with pytest.raises(LLMKitError, match="unknown objective 'spam'.*span"):
        pretrain(load_config(PretrainConfig, None, [*over, "objective=spam"]), tokenizer=tok)
    summary = pretrain(load_config(PretrainConfig, None, over), tokenizer=tok)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 30 and losses[-1] < 0.8 * losses[0], losses
    model, tok2 = load_model(summary["final_checkpoint"])
    assert isinstance(model, T5) and model.cfg.vocab_size == tok.vocab_size + 2 + 1  # 2 sentinels + start
    g = generate(model, tok2.encode("ROMEO: "), SamplingParams(temperature=0.0, max_new_tokens=4))
    assert 1 <= len(g.tokens) <= 4 or g.completions[0].finish_reason == "stop"
