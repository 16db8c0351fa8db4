"""Masked-LM pretraining of a BERT encoder: the pieces the pretraining recipe swaps in for
`objective=mlm` (recipes/pretrain.py), around the same data, loop, optimiser and checkpoints.

The token windows are the decoder's (train/data.py); each row of T tokens is corrupted by
`losses.mlm_mask` (15% selected: 80% [MASK], 10% random, 10% kept) and the encoder predicts the
selected originals (`losses.mlm_loss`). The corruption of step s is drawn from its own generator
seeded by (seed, s), so a resumed run masks exactly as the uninterrupted one would, and the
validation masks are the same at every evaluation (a comparable curve).

The mask token is the tokenizer's "[MASK]" when it has one; a tokenizer without one (llmkit's
byte-level BPE) gets one extra embedding row, id = tokenizer.vocab_size, recorded in the
checkpoint's config.json (mask_token_id), which `llmkit fill-mask` reads.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..errors import LLMKitError
from ..losses import mlm_loss, mlm_mask
from ..models.encoder import ENCODER_PRESETS, Encoder, EncoderConfig
from .dist import all_reduce_sum, unwrap

MASK_TOKEN = "[MASK]"


def build_encoder(preset: str, overrides: dict, tokenizer, seq_len: int) -> Encoder:
    """An encoder preset with a masked-LM head, sized to the tokenizer (+1 row for [MASK] if it has none)."""
    if preset not in ENCODER_PRESETS:
        from ..errors import closest

        raise LLMKitError(f"objective=mlm trains an encoder: preset {preset!r}{closest(preset, ENCODER_PRESETS)} "
                          f"is not one of {', '.join(ENCODER_PRESETS)}")
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    vocab = tokenizer.vocab_size if mask_id is not None else tokenizer.vocab_size + 1
    over = {"vocab_size": vocab, "max_seq_len": seq_len, **overrides, "mlm_head": True,
            "mask_token_id": mask_id if mask_id is not None else tokenizer.vocab_size}
    pad = tokenizer.pad_id
    over.setdefault("pad_token_id", pad if pad is not None else 0)
    cfg = EncoderConfig.from_preset(preset, **over)
    if cfg.vocab_size < vocab:
        raise LLMKitError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab} (with [MASK])")
    if cfg.max_seq_len < seq_len:
        raise LLMKitError(f"data.seq_len {seq_len} exceeds the encoder's max_seq_len {cfg.max_seq_len}")
    return Encoder(cfg)


class Masker:
    """Corrupts token windows for model `cfg` (an EncoderConfig): `(x, step) -> (inputs, labels)`.
    Special tokens (the documents' EOS separators, [CLS]/[SEP]/[PAD] of a BERT vocabulary) are never selected."""

    def __init__(self, cfg: EncoderConfig, special_ids, seed: int, p: float = 0.15):
        self.mask_id, self.vocab, self.seed, self.p = cfg.mask_token_id, cfg.vocab_size, seed, p
        self.special = torch.tensor(sorted({*special_ids, cfg.mask_token_id}), dtype=torch.long)

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return mlm_mask(x.cpu(), torch.isin(x.cpu(), self.special), self.mask_id, self.vocab, gen, self.p)


def mlm_train_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loss_fn of train_step for batch {"idx": corrupted ids, "targets": labels} (B, T)."""
    logits = unwrap(model).mlm_logits(model(batch["idx"]))  # (B, T, V)
    loss = mlm_loss(logits, batch["targets"])
    return loss, {"loss": loss, "ce": loss}


@torch.no_grad()
def mlm_evaluate(model, read, windows: list, batch_size: int, masker: Masker, device, rank: int = 0,
                 world: int = 1, autocast=None) -> dict:
    """Masked-LM loss and accuracy on the validation windows, with fixed masks (masker step -1 - i for
    batch i). val_loss is the mean CE over masked tokens; val_ppl its exp."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # (NLL sum, correct, masked tokens)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for r in range(math.ceil(len(batches) / world)):  # FSDP: every rank runs as many forwards
        j = r * world + rank
        x, _ = read(batches[min(j, len(batches) - 1)])
        inputs, labels = masker(x, -1 - min(j, len(batches) - 1))
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast or contextlib.nullcontext():
            logits = unwrap(model).mlm_logits(model(inputs)).float()
        n = (labels != -100).sum()
        if j < len(batches):
            sums += torch.stack([mlm_loss(logits, labels).double() * n, (logits.argmax(-1) == labels).sum().double(),
                                 n.double()])
    all_reduce_sum(sums)
    model.train()
    loss = float(sums[0] / sums[2].clamp(min=1))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_mlm_accuracy": float(sums[1] / sums[2].clamp(min=1))}
