"""Full fine-tuning: every parameter trains; the result is a checkpoint, not an adapter."""

from __future__ import annotations

import torch.nn as nn

from .registry import PeftMethod, register


def unfreeze(model: nn.Module, cfg=None, tokenizer=None) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


FULL = register(PeftMethod(name="full", default_lr=2e-5, apply=unfreeze, saves_adapter=False))
