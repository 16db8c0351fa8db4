"""AdamW with weight-decay parameter groups."""

from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights, dim >= 2); never biases or norm gains.

    Decaying gains/biases pulls them to 0, which hurts (as in GPT-2 / nanoGPT / LLaMA training).
    Tied weights appear once (named_parameters deduplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over `param_groups`; fused kernel on CUDA."""
    if fused is None:
        fused = any(p.is_cuda for p in model.parameters())
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)
