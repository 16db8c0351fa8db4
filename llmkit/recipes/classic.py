"""The classic language models on the speedrun's split: `llmkit speedrun --arch ngram|rnn|gru|lstm`.

The speedrun (speedrun.py) splits the text, trains the tokenizer and hands the rest here when the
architecture is not the transformer, so every row of the lectures' comparison (n-gram -> RNN -> GRU ->
LSTM -> transformer) sees the same training bytes, the same tokenizer and the same held-out text, and
is scored the same way: every held-out token after the first, from all the tokens before it that the
model can use, in bits per held-out byte.

  ngram       count n-grams of orders 1..max_order on the first 95% of the training tokens, pick the
              order with the best bits/token on the last 5%, refit on all of them (seconds; no budget used)
  rnn|gru|lstm  truncated BPTT over `batch_size` parallel streams of the training tokens, windows of
              `bptt` tokens, the state carried across windows and detached; AdamW, warm-up then cosine
              decay over the wall-clock budget, gradient clipping (Pascanu et al. 2013: without it an
              RNN's gradients explode); scored by reading the held-out stream in order with the state
              carried (an RNN's context is unbounded).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..classic.ngram import NGramLM, fit_best_order
from ..classic.rnn import RNNConfig, RNNLM, detach_state, stream_logprobs
from ..config import ranged
from ..errors import LLMKitError
from ..io import atomic_write_text

ARCHS = ("transformer", "ngram", "rnn", "gru", "lstm")


@dataclass
class ClassicSection:
    # n-gram
    max_order: int = ranged(6, ">=1")  # orders 1..max_order are tried on the dev split
    smoothing: str = "kneser_ney"  # kneser_ney | add_k
    discount: float = ranged(0.75, "(0,1)")
    k: float = ranged(0.01, ">0")
    # recurrent: sizes (same for rnn, gru and lstm, so the gates are the only difference)
    d_embed: int = ranged(256, ">0")
    d_hidden: int = ranged(512, ">0")
    n_layer: int = ranged(1, ">0")
    dropout: float = ranged(0.25, "[0,1)")
    fused: bool = True  # torch.nn's fused recurrent loop (same weights and outputs as the written-out cells)
    bptt: int = ranged(64, ">0")  # truncated-BPTT window
    batch_size: int = ranged(32, ">0")  # parallel streams
    lr: float = ranged(3e-3, ">0")
    min_lr: float = ranged(1e-4, ">=0")
    warmup_steps: int = ranged(50, ">0")
    weight_decay: float = ranged(0.01, ">=0")
    grad_clip: float = ranged(1.0, ">0")


def bits_per_byte(logprobs: torch.Tensor | list[float], tokenizer, ids: list[int], text: str) -> float:
    """nats of the tokens after the first -> bits per byte of the text those tokens cover (as
    scoring.score_text counts them: the first token's bytes are not predicted)."""
    nll = -float(torch.as_tensor(logprobs, dtype=torch.float64).sum())
    first = tokenizer.decode(ids[:1], skip_special_tokens=True)
    return nll / math.log(2) / max(1, len(text.encode("utf-8")) - len(first.encode("utf-8")))


def train_ngram(c: ClassicSection, train_ids: list[int], vocab_size: int) -> tuple[NGramLM, dict]:
    if c.max_order < 1:
        raise LLMKitError(f"classic.max_order must be >= 1, got {c.max_order}")
    lm, dev_bits = fit_best_order(train_ids, vocab_size, orders=range(1, c.max_order + 1),
                                  smoothing=c.smoothing, discount=c.discount, k=c.k)
    n_params = sum(len(nexts) for table in lm.counts[1:] for nexts in table.values())  # stored n-gram counts
    return lm, {"order": lm.order, "dev_bits_per_token": dev_bits, "params": n_params}


def _streams(ids: list[int], B: int) -> torch.Tensor:
    """The token stream cut into B contiguous streams: (B, len(ids) // B)."""
    n = len(ids) // B
    return torch.tensor(ids[:n * B]).view(B, n)


def train_recurrent(kind: str, c: ClassicSection, train_ids: list[int], vocab_size: int, budget_s: float,
                    out: Path, seed: int = 1337, progress: bool = True) -> tuple[RNNLM, dict]:
    from ..progress import progress_bar
    from ..train.loop import MetricsLogger, clip_grad_norm, plot_metrics
    from ..train.schedule import decayed_lr, set_lr

    torch.manual_seed(seed)
    model = RNNLM(RNNConfig(kind=kind, vocab_size=vocab_size, d_embed=c.d_embed, d_hidden=c.d_hidden,
                            n_layer=c.n_layer, dropout=c.dropout, fused=c.fused))
    data = _streams(train_ids, c.batch_size)  # (B, N)
    if data.shape[1] <= c.bptt + 1:
        raise LLMKitError(f"{len(train_ids)} training tokens are too few for {c.batch_size} streams of "
                          f"{c.bptt}-token windows")
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.99))
    log = MetricsLogger(out / "metrics.jsonl", tensorboard=False)
    bar = progress_bar(total=int(budget_s), enabled=progress, desc=kind, unit="s")
    t0 = time.perf_counter()
    step, tokens, state, pos = 0, 0, None, 0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            break
        if pos + c.bptt + 1 > data.shape[1]:  # next epoch: start the streams again with a fresh state
            pos, state = 0, None
        x, y = data[:, pos:pos + c.bptt], data[:, pos + 1:pos + c.bptt + 1]  # (B, T) each
        pos += c.bptt
        lr = c.lr * (step + 1) / c.warmup_steps if step < c.warmup_steps else \
            decayed_lr(elapsed / budget_s, max_lr=c.lr, min_lr=c.min_lr)
        set_lr(opt, lr)
        model.train()
        logits, state = model(x, state)
        state = detach_state(state)  # truncated BPTT: gradients stop at the window's start
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad_norm(model.parameters(), c.grad_clip)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0:
            now = time.perf_counter() - t0
            log.log({"step": step, "loss": loss.item(), "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                     "tokens_per_s": tokens / now, "elapsed_s": now})
            bar.update(int(now) - bar.n)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    log.close()
    wall = time.perf_counter() - t0
    from ..train.loop import read_metrics

    records = read_metrics(out / "metrics.jsonl")
    if records:
        plot_metrics(records, out / "loss.png", title=f"{kind} {c.n_layer}x{c.d_hidden}")
    return model, {"steps": step, "tokens": tokens, "train_wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9),
                   "params": sum(p.numel() for p in model.parameters())}


def estimate_stream_seconds(arch: str, c: ClassicSection, vocab_size: int, n_tokens: int) -> float:
    """Time `stream_logprobs` will take on n_tokens, timed on 256 tokens of a fresh model of the run's shape."""
    if arch == "ngram":
        return 0.0
    model = RNNLM(RNNConfig(kind=arch, vocab_size=vocab_size, d_embed=c.d_embed, d_hidden=c.d_hidden,
                            n_layer=c.n_layer, fused=c.fused))
    ids = list(range(min(vocab_size, 256))) * (256 // min(vocab_size, 256) + 1)
    t0 = time.perf_counter()
    stream_logprobs(model, ids[:257])
    return 1.5 * (time.perf_counter() - t0) * n_tokens / 256  # margin: a shared machine's load varies


def classic_speedrun(arch: str, c: ClassicSection, *, out: Path, tok, train_text: str, heldout_text: str,
                     budget_left_s: float, seed: int, progress: bool) -> dict:
    """Train `arch` on the training text within `budget_left_s`, score the held-out text; write
    OUT/classic.json, OUT/report.md (and OUT/loss.png, OUT/model.safetensors for recurrent models)."""
    if arch not in ARCHS[1:]:
        raise LLMKitError(f"unknown classic architecture {arch!r} (choose from {', '.join(ARCHS[1:])})")
    t0 = time.perf_counter()
    train_ids, held_ids = tok.encode(train_text), tok.encode(heldout_text)
    if arch == "ngram":
        lm, summary = train_ngram(c, train_ids, tok.vocab_size)
        summary.update(train_wall_s=time.perf_counter() - t0, tokens=len(train_ids), steps=1)
        summary["tokens_per_s"] = len(train_ids) / summary["train_wall_s"]
        lps = lm.logprobs(held_ids)
    else:
        model, summary = train_recurrent(arch, c, train_ids, tok.vocab_size, budget_left_s, out, seed, progress)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        lps = stream_logprobs(model, held_ids)
    bpb = bits_per_byte(lps, tok, held_ids, heldout_text)
    result = {"arch": arch, "heldout_bits_per_byte": bpb, "heldout_tokens": len(held_ids),
              "heldout_bytes": len(heldout_text.encode("utf-8")), "vocab_size": tok.vocab_size,
              "classic": asdict(c), **summary}
    (out / "classic.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", _report(result))
    return result


def _report(r: dict) -> str:
    extra = (f"| chosen order (dev bits/token by order) | {r['order']} "
             f"({', '.join(f'{n}: {b:.3f}' for n, b in r['dev_bits_per_token'].items())}) |\n"
             if r["arch"] == "ngram" else
             f"| steps / tokens | {r['steps']:,} / {r['tokens']:,} |\n")
    return f"""# llmkit speedrun report: {r['arch']}

| metric | value |
|---|---|
| **held-out bits per byte** | **{r['heldout_bits_per_byte']:.4f}** |
| parameters | {r['params']:,} |
| training time | {r['train_wall_s']:.0f} s ({r['tokens_per_s']:,.0f} tokens/s) |
{extra}"""
