"""Tail averaging: the uniform mean of the weights over the last part of a run.

Averaging the iterates along the end of an optimiser's trajectory (Polyak & Juditsky 1992; SWA,
Izmailov et al. 2018; LAWA, Sanyal et al. 2023) lands nearer the middle of the low-loss region
the run circles than any single iterate does. In the 10-minute speedrun the mean over the last 20%
scored 0.010-0.019 held-out bits/byte better than the same run's last weights (5 runs, BENCHMARKS.md);
longer tails, reaching into the high-LR part of the schedule, made it worse.

The mean is kept as a running one, a_n = a_{n-1} + (p - a_{n-1}) / n, so it costs one copy of the
weights and one lerp per step. Step checkpoints store it beside the raw weights
(train/checkpoint.py: AVERAGE_FILE), so a resumed run continues the same mean.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LLMKitError
from .dist import unwrap


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor; an FSDP2 shard (DTensor) is all-gathered (every rank must call)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TailAverage:
    """Running uniform mean of a model's trainable parameters (any wrapper: DDP, FSDP2 shards)."""

    def __init__(self, model: nn.Module):
        self.params = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.avg: dict[str, torch.Tensor] = {}
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        for name, p in self.params:
            if self.n == 1:
                self.avg[name] = p.detach().clone()
            else:
                self.avg[name].lerp_(p.detach(), 1.0 / self.n)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, p in self.params:
            p.copy_(self.avg[name])

    def state(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """(full tensors by parameter name, n) for a checkpoint, None before the first update; all ranks
        call (FSDP shards are gathered)."""
        if not self.n:
            return None
        return {name: _full(a).detach().cpu().contiguous() for name, a in self.avg.items()}, self.n

    @torch.no_grad()
    def load_state(self, state: tuple[dict[str, torch.Tensor], int] | None) -> None:
        """Continue a mean from state() (full tensors; FSDP2 ranks keep their shard); None: not started."""
        self.avg, self.n = {}, 0
        if state is None:
            return
        tensors, n = state
        want = {name for name, _ in self.params}
        if tensors.keys() != want:
            raise LLMKitError(f"the stored weight mean does not fit this model (parameters differ: "
                              f"{sorted(tensors.keys() ^ want)[:3]})")
        for name, p in self.params:
            t = tensors[name].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP2 shard: keep this rank's piece
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t, p.device_mesh, p.placements)
            self.avg[name] = t
        self.n = n


def in_tail(progress: float, tail: float) -> bool:
    """Whether a step that ends at `progress` (fraction of the run, 0..1) is averaged."""
    return tail > 0 and progress > 1.0 - tail
