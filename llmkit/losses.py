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


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log p(targets | logits): logits (..., V), targets (...) -> (...) in fp32; 0 where targets == ignore_index.
    Differentiable: the one place llmkit turns logits into per-token log-probabilities."""
    keep = targets != ignore_index
    lp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.where(keep, 0).unsqueeze(-1)).squeeze(-1)
    return lp.where(keep, 0.0)


def sequence_logprobs(model, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      **forward_kw) -> torch.Tensor:
    """Per-token log p(targets[b, t] | idx[b, :t+1]) -> (B, T) fp32, for a padded batch.

    idx (B, T) are the inputs and targets (B, T) the next tokens (idx shifted by one), with
    `ignore_index` wherever a token is not scored (padding, prompt tokens: a completion mask); those
    positions get 0, so `.sum(-1)` is a sequence's completion log-likelihood. Runs with gradients (the
    caller decides: DPO/PPO need them, scoring wraps it in inference_mode); `forward_kw` go to the model
    (input_pos, a document mask for packed rows).
    """
    return gather_logprobs(model(idx, **forward_kw), targets, ignore_index)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1):
    P(chosen > rejected) = σ(r_c − r_r), loss = −mean log σ(r_c − r_r). r_chosen, r_rejected: (B,) rewards
    of the two replies to the same prompt. TRL's RewardTrainer computes the same (without its optional margin).

    -> (loss, {"loss", "accuracy": share of pairs with r_c > r_r, "margin": mean r_c − r_r,
    "reward_chosen", "reward_rejected": mean rewards})."""
    diff = r_chosen.float() - r_rejected.float()  # (B,)
    loss = -F.logsigmoid(diff).mean()
    metrics = {"loss": loss.detach(), "accuracy": (diff > 0).float().mean(), "margin": diff.mean().detach(),
               "reward_chosen": r_chosen.detach().float().mean(), "reward_rejected": r_rejected.detach().float().mean()}
    return loss, metrics
