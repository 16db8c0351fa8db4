"""Interleaved A/B of one speedrun training step: torch nn.Dropout vs llmkit Dropout.

    python benchmarks/dropout_ab.py

The speedrun's default model (SpeedrunConfig, vocab 512), bf16 autocast, Muon, batch 8x256, 2 threads;
median ms/step of 7 rounds of 5 steps per engine. Results: BENCHMARKS.md.
"""
import statistics
import time

import torch
import torch.nn as nn

from llmkit.models import Transformer
from llmkit.models.modules import Dropout
from llmkit.recipes.speedrun import SpeedrunConfig, _model_config
from llmkit.train.loop import autocast_context, lm_loss, train_step
from llmkit.train.optim import build_muon


def make(cfg, sr: SpeedrunConfig, torch_dropout: bool):
    model = Transformer(cfg).train()
    if torch_dropout:  # swap each llmkit Dropout for torch's, same p
        for mod in list(model.modules()):
            for name, child in mod.named_children():
                if isinstance(child, Dropout):
                    setattr(mod, name, nn.Dropout(child.p))
    return model, build_muon(model, lr=sr.lr, weight_decay=sr.weight_decay)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    sr = SpeedrunConfig(vocab_size=512)  # the bf16 run's vocabulary
    cfg = _model_config(sr, sr.vocab_size)
    autocast = autocast_context(torch.device("cpu"), "bfloat16")
    x = torch.randint(0, sr.vocab_size, (sr.batch_size, sr.seq_len))
    y = torch.randint(0, sr.vocab_size, (sr.batch_size, sr.seq_len))
    engines = {"torch": make(cfg, sr, True), "llmkit": make(cfg, sr, False)}
    times = {k: [] for k in engines}
    for model, opt in engines.values():  # warm-up
        for _ in range(3):
            train_step(model, opt, [{"idx": x, "targets": y}], loss_fn=lm_loss, autocast=autocast)
    for _ in range(7):
        for k, (model, opt) in engines.items():
            t0 = time.perf_counter()
            for _ in range(5):
                train_step(model, opt, [{"idx": x, "targets": y}], loss_fn=lm_loss, autocast=autocast)
            times[k].append((time.perf_counter() - t0) / 5 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print({k: round(v, 1) for k, v in med.items()}, "ms/step; speedup", round(med["torch"] / med["llmkit"], 3))


if __name__ == "__main__":
    main()
