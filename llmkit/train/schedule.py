"""Learning-rate schedules as pure functions of the step (no optimiser state, trivially resumable)."""

from __future__ import annotations

import math

from ..errors import LLMKitError

KINDS = ("cosine", "linear", "constant")


def lr_at(step: int, *, max_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
          kind: str = "cosine") -> float:
    """LR for optimiser step `step` (0-based).

    Linear warm-up from max_lr/warmup to max_lr over `warmup_steps` (Goyal et al. 2017), then decay
    to `min_lr` at `total_steps`: cosine (Loshchilov & Hutter 2017, SGDR without restarts),
    linear, or constant. Steps past the end stay at min_lr.
    """
    if kind not in KINDS:
        raise LLMKitError(f"unknown lr schedule {kind!r}; choose one of {', '.join(KINDS)}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return decayed_lr((step - warmup_steps) / decay_steps, max_lr=max_lr, min_lr=min_lr, kind=kind)


def decayed_lr(progress: float, *, max_lr: float, min_lr: float = 0.0, kind: str = "cosine") -> float:
    """LR after warm-up at `progress` in [0, 1] of the decay phase (by steps, or by wall-clock time
    for runs with a time budget)."""
    progress = min(1.0, max(0.0, progress))
    if kind == "constant":
        return max_lr
    if kind == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return min_lr + coeff * (max_lr - min_lr)


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into every parameter group (groups may carry an `lr_scale` multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
