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


# ------------------------------------------------------------------ preference optimisation (DPO, IPO)
def _preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Batch means of the implicit rewards r = β·(log π − log π_ref), of their margin, and the reward
    accuracy: the share of pairs with r_chosen > r_rejected (strictly, as trl counts: ties, e.g. at
    policy = reference, are not correct)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"reward_chosen": c.mean(), "reward_rejected": r.mean(), "reward_margin": (c - r).mean(),
            "reward_accuracy": (c > r).float().mean()}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), mean over the batch.

    Inputs (B,): summed log-probabilities of each chosen / rejected response under the policy and the
    reference. With Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):

        loss = −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)

    ε = label_smoothing > 0 is conservative DPO (Mitchell 2023: the labels flip with probability ε),
    as trl's "sigmoid" loss computed it up to v0.2x. At policy = reference Δ = 0 and loss = ln 2.
    Returns (loss, metrics): see _preference_metrics.
    """
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,) log-ratios
    rejected = policy_rejected_logps - ref_rejected_logps
    delta = beta * (chosen - rejected)
    loss = (-(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)).mean()
    return loss, {"loss": loss.detach(), **_preference_metrics(beta * chosen, beta * rejected)}


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Identity Preference Optimisation (Azar et al. 2023, eq. 17; β is the paper's τ), mean over the batch:

        loss = (Δ − 1/(2β))²,   Δ as in dpo_loss

    Inputs (B,) are length-normalised: each response's log-prob *averaged* over its tokens, as trl
    does (its ipo loss divides the summed log-ratios by the completion lengths, a choice it says the
    IPO authors confirmed), so that β means the same for long and short responses. The squared loss
    regresses the margin to 1/(2β) instead of pushing it to infinity as DPO's logistic loss does.
    label_smoothing is not used (it is accepted so both losses share one signature).
    """
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = ((chosen - rejected - 1 / (2 * beta)) ** 2).mean()
    return loss, {"loss": loss.detach(), **_preference_metrics(beta * chosen, beta * rejected)}
