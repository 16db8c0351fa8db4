"""PPO for RLHF (Ouyang et al. 2022, InstructGPT; Schulman et al. 2017; the N+ implementation details of
Huang et al. 2024): a policy with a value head, rollouts from the inference engine, a per-token KL penalty to
the reference, GAE, and several epochs of clipped updates per rollout. Each iteration of the shared RL loop
(recipes/rl.py: rollout, score, update, log, checkpoint) is, for PPO,

    rollout     P prompts x G completions (llmkit.align.rollout) + old log-probs
    score       the reward sources summed: a reward model (--reward-model, reward "rm": its score of prompt +
                completion at the last token), verifiable checks (correct, format), or both
    rewards     per token: -β (log π - log π_ref) on every response token, + the score on the last one
    values      the value head on the rollout (no grad); GAE(γ, λ) -> advantages (whitened) and returns
    update      `epochs` passes in shuffled minibatches, each a `train_step` with loss_fn = ppo_losses
    β           fixed (ppo.kl_coef), or adapted towards ppo.kl_target (Ziegler et al. 2019, `adaptive_kl_coef`)

    llmkit align --method ppo --model M --reward-model RM --data prompts.jsonl --out OUT data.system=null data.prefill=

Prompts: a plain {"prompt": ...} JSONL, the prompts of preference data (dpo_en_demo.json, hh_rlhf_*.jsonl.gz),
or question/answer rows for verifiable rewards. The value head is one linear layer on the decoder's final
hidden states (B, T, C) -> (B, T), trained with the adapter (`PolicyWithValue`); it is saved beside the
adapter as value_head.safetensors and in the step checkpoints, with β.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..align.tasks import TOY
from ..errors import LLMKitError
from ..io import atomic_path
from ..losses import entropy_from_logits, gae, gather_logprobs, masked_mean, ppo_losses
from ..peft import PeftSections, get_method
from ..peft.lora import LoRAConfig
from .config import OptimSection, TrainSection, check_inputs, check_sections
from .rl import Algorithm, PromptDataSection, resolve_rewards, summary_lines, train_rl  # noqa: F401 (summary_lines)


@dataclass
class PPOSection:
    group_size: int = 2  # completions per prompt
    prompts_per_step: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05  # β of the per-token KL penalty in the reward (the start value when adaptive)
    kl_target: float | None = None  # adaptive β (Ziegler et al. 2019): the per-sequence KL to hold; None: fixed β
    kl_horizon: float = 10000.0  # the adaptive controller's horizon, in completions (trl's default)
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    epochs: int = 4  # passes over each rollout
    whiten: bool = True  # standardise the advantages over the rollout's response tokens
    # rewards summed into the score (llmkit.align.rewards: rm, correct, exact, format); auto: rm with
    # --reward-model, else correct,format
    rewards: str = "auto"


@dataclass
class PPOConfig(PeftSections):  # + every PEFT method's section (lora:, adapter:, ...)
    model: str = ""
    reward_model: str | None = None  # --reward-model: an RM directory (llmkit align --method rm), reward "rm"
    method: str = "lora"
    data: PromptDataSection = field(default_factory=lambda: PromptDataSection(seq_len=512))
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=0, weight_decay=0.0,
                                                                     schedule="constant"))
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=30, batch_size=8, seed=0, eval_every=0,
                                                                     ckpt_every=10, keep_last=2))
    ppo: PPOSection = field(default_factory=PPOSection)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(dropout=0.0))

    def validate(self) -> tuple[int, int]:
        get_method(self.method)
        check_inputs(self, f"--data FILE.jsonl, or --data {TOY}")
        micro, accum = check_sections(self.data, self.optim, self.train, 1)
        p = self.ppo
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "epochs"):
            if getattr(p, name) < 1:
                raise LLMKitError(f"ppo.{name} must be >= 1, got {getattr(p, name)}")
        if not p.temperature > 0 or p.kl_coef < 0 or not 0 < p.clip_eps < 1:
            raise LLMKitError(f"ppo.temperature must be > 0, ppo.kl_coef >= 0 and ppo.clip_eps in (0, 1) "
                              f"(got {p.temperature}, {p.kl_coef}, {p.clip_eps})")
        if p.kl_target is not None and not (p.kl_target > 0 and p.kl_horizon > 0 and p.kl_coef > 0):
            raise LLMKitError(f"an adaptive KL (ppo.kl_target={p.kl_target}) needs ppo.kl_target > 0, ppo.kl_horizon > 0 "
                              f"and a starting ppo.kl_coef > 0 (got {p.kl_horizon}, {p.kl_coef})")
        rows = p.prompts_per_step * p.group_size
        if rows % self.train.batch_size:
            raise LLMKitError(f"a rollout of {rows} completions (ppo.prompts_per_step x ppo.group_size) must split "
                              f"into minibatches of train.batch_size {self.train.batch_size}")
        p.rewards = resolve_rewards(p.rewards, self.reward_model, "ppo.rewards")
        return micro, accum


class PolicyWithValue(nn.Module):
    """The policy and a scalar value head V(s_t) on its final hidden states; one module, so the optimiser,
    gradient clipping and train_step see both."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) -> (logits (B, T, V), values (B, T))."""
        h = self.policy(idx, return_hidden=True)  # (B, T, C)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()


def ppo_loss_fn(p: PPOSection):
    def loss_fn(model: PolicyWithValue, batch: dict):
        logits, values = model(batch["idx"])
        logps = gather_logprobs(logits, batch["targets"])  # (B, T)
        entropy = entropy_from_logits(logits)  # (B, T): the bonus when ent_coef > 0, logged either way
        return ppo_losses(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                          batch["returns"], batch["mask"], clip_eps=p.clip_eps, value_clip=p.value_clip,
                          vf_coef=p.vf_coef, entropy=entropy, ent_coef=p.ent_coef)

    return loss_fn


@torch.no_grad()
def rollout_values(model: PolicyWithValue, idx: torch.Tensor, micro: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(idx[i:i + micro].to(dev))[1].cpu() for i in range(0, idx.size(0), micro)])


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's reward per token (B, T): -β (log π - log π_ref) on each response token (the k1 KL
    estimate), plus the sequence score (B,) on the last response token. Returns (rewards, kl (B, T))."""
    kl = (logps - ref_logps) * mask if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.size(1))).argmax(1)  # (B,) index of each row's last response token
    rewards[torch.arange(mask.size(0)), last] += scores
    return rewards, kl


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: float, n: int) -> float:
    """The next β of the adaptive KL controller (Ziegler et al. 2019, sec. 2.2; trl's AdaptiveKLController):

        e = clip(KL / KL_target - 1, -0.2, 0.2)        β <- β (1 + e · n / horizon)

    kl: the measured KL(π‖π_ref) per completion (summed over its tokens) of the rollout just scored,
    n: the completions it holds. β grows while the policy drifts past the target and shrinks below it."""
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + err * n / horizon)


def ppo_algorithm(p: PPOSection):
    """make(model, device) -> Algorithm: the policy and its value head train together; advantages from the
    per-token rewards by GAE; β (kl_coef) is the resumable state."""

    def make(model: nn.Module, device) -> Algorithm:
        pv = PolicyWithValue(model)
        ctl = {"kl_coef": p.kl_coef}

        def advantages(r, score: torch.Tensor, ref, micro: int, autocast) -> tuple[dict, dict]:
            pv.eval()
            old_values = rollout_values(pv, r.idx, micro) * r.mask
            pv.train()
            beta = ctl["kl_coef"]
            tok_rewards, kl = token_rewards(score, r.old_logps, ref, r.mask, beta)
            adv, returns = gae(tok_rewards, old_values, r.mask, p.gamma, p.lam)
            if p.whiten:  # Huang et al. 2024 detail: standardise over the response tokens of the rollout
                mu = masked_mean(adv, r.mask)
                var = masked_mean((adv - mu) ** 2, r.mask)
                adv = (adv - mu) / (var.sqrt() + 1e-8) * r.mask
            seq_kl = float(kl.sum(1).mean())  # per completion, summed over its tokens (k1)
            if p.kl_target is not None:
                ctl["kl_coef"] = adaptive_kl_coef(beta, seq_kl, p.kl_target, p.kl_horizon, r.idx.size(0))
            return {"advantages": adv, "returns": returns, "old_values": old_values}, {"kl": seq_kl, "kl_coef": beta}

        def save(out: Path) -> None:
            from safetensors.torch import save_file

            with atomic_path(out / "value_head.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in pv.value_head.state_dict().items()}, str(tmp))

        return Algorithm(pv, ppo_loss_fn(p), advantages, uses_reference=p.kl_coef > 0, state=lambda: dict(ctl),
                         load_state=ctl.update, save=save)

    return make


def ppo(cfg: PPOConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False, force: bool = False,
        resume: bool | str = False, rewards: dict | None = None) -> dict:
    """Train with PPO and write cfg.train.out_dir; returns the summary (also in ppo.json). `rewards`:
    {name: function (completion, example) -> float} instead of cfg.ppo.rewards."""
    return train_rl(cfg, cfg.ppo, "ppo", ppo_algorithm(cfg.ppo), model, tokenizer, quiet, force, resume, rewards)
