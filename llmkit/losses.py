"""Losses: small pure functions, one per method, each with the paper it comes from."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy. logits (B, T, V), targets (B, T); ignore_index masks positions."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def load_balancing_loss(router_logits: list[torch.Tensor], n_expert: int, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4), as Mixtral computes it.

    router_logits: per MoE layer (N, E), concatenated over layers. With f_e the fraction of
    (token, slot) assignments that go to expert e and P_e the mean router probability of e,
    loss = E * sum_e f_e * P_e  (= 1 for a perfectly uniform router, at its minimum).
    """
    logits = torch.cat([r.float() for r in router_logits], dim=0)  # (N*L, E)
    probs = F.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # (N*L, k)
    assign = F.one_hot(chosen, n_expert).float()  # (N*L, k, E)
    f = assign.mean(dim=0)  # (k, E)
    p = probs.mean(dim=0)  # (E,)
    return n_expert * (f * p[None]).sum()
