"""GRPO recipe (Shao et al. 2024, DeepSeekMath sec. 4; DeepSeek-AI 2025, DeepSeek-R1): RL with
verifiable rewards and no value model. One explicit loop; each iteration is

    rollout     P prompts x G sampled completions (inference engine, KV cache) + old log-probs; each prompt
                ends with data.prefill ("<think>"), so even a 135M model starts in the R1 format
    rewards     the chosen plain reward functions (llmkit.align.rewards), summed per completion
    advantages  standardised within each prompt's group (losses.group_advantages)
    reference   per-token log-probs of the reference policy (the model before training: the adapter switched
                off, or a frozen copy), for β·KL
    update      `epochs` passes over the P·G rows in shuffled minibatches of train.batch_size rows, each
                one `train_step` with loss_fn = grpo_loss (clipped ratio + β·k3 KL)

    cfg = load_config(GRPOConfig, None, ["model=M", "data.files=toy-arithmetic", "train.steps=30"])
    grpo(cfg)

train.steps counts iterations (rollouts); the optimiser takes epochs · P·G / batch_size steps in each.
Logged per iteration to metrics.jsonl: reward (mean of the summed rewards), each reward's mean
(reward_correct is the accuracy, reward_format the format rate), kl, clip_frac, loss, response length,
the share of groups with no signal (all rewards equal), grad norm; greedy accuracy and format rate on
held-out prompts at the start, every eval_every iterations and at the end (eval_*). Output OUT: the
adapter (or a checkpoint for full fine-tuning), metrics.jsonl, rewards.png and grpo.json. The loop, step
checkpoints, `--resume` and the stop on non-finite numbers are the shared RL loop's (recipes/rl.py);
this file holds what is GRPO's own: its config and its advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..align.tasks import TOY
from ..errors import LLMKitError
from ..losses import group_advantages, grpo_loss, sequence_logprobs
from ..peft import PeftSections, get_method
from ..peft.lora import LoRAConfig
from .config import OptimSection, TrainSection, check_inputs, check_sections
from .rl import Algorithm, PromptDataSection, Reference, resolve_rewards, summary_lines, train_rl  # noqa: F401 (Reference, summary_lines: re-exported)


@dataclass
class GRPOSection:
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 4  # P prompts per rollout
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2  # ε of the clipped ratio
    beta: float = 0.04  # β of the k3 KL to the reference (DeepSeekMath's value); 0: no reference model
    epochs: int = 1  # passes over each rollout (DeepSeekMath's μ)
    per_sequence: bool = False  # DeepSeekMath eq. 3's per-completion mean; default: token-level mean (see grpo_loss)
    # rewards summed (llmkit.align.rewards: correct, exact, format, rm); auto: rm with --reward-model, else correct,format
    rewards: str = "auto"


@dataclass
class GRPOConfig(PeftSections):  # + every PEFT method's section (lora:, adapter:, ...)
    model: str = ""
    reward_model: str | None = None  # --reward-model: an RM directory (llmkit align --method rm), reward "rm"
    method: str = "lora"  # any PEFT method of llmkit.peft (lora, full, ...)
    data: PromptDataSection = field(default_factory=lambda: PromptDataSection(seq_len=512))
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=0, weight_decay=0.0,
                                                                     schedule="constant"))
    # batch_size: completions per optimiser step (a minibatch of the rollout); steps: iterations (rollouts)
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=30, batch_size=16, seed=0, eval_every=0,
                                                                     ckpt_every=10, keep_last=2))
    grpo: GRPOSection = field(default_factory=GRPOSection)
    # dropout 0: the old log-probs (eval mode) and the loss's (train mode) must come from the same policy
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(dropout=0.0))

    def validate(self) -> tuple[int, int]:
        get_method(self.method)
        check_inputs(self, f"--data FILE.jsonl, or --data {TOY}")
        micro, accum = check_sections(self.data, self.optim, self.train, 1)
        g = self.grpo
        if g.group_size < 2:
            raise LLMKitError(f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), "
                              f"got {g.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "epochs"):
            if getattr(g, name) < 1:
                raise LLMKitError(f"grpo.{name} must be >= 1, got {getattr(g, name)}")
        if not g.temperature > 0:
            raise LLMKitError(f"grpo.temperature must be > 0 (the group needs different samples), got {g.temperature}")
        if g.beta < 0 or not 0 < g.clip_eps < 1:
            raise LLMKitError(f"grpo.beta must be >= 0 and grpo.clip_eps in (0, 1) (got {g.beta}, {g.clip_eps})")
        rows = g.prompts_per_step * g.group_size
        if rows % self.train.batch_size:
            raise LLMKitError(f"a rollout of {rows} completions (grpo.prompts_per_step x grpo.group_size) must split "
                              f"into minibatches of train.batch_size {self.train.batch_size}")
        g.rewards = resolve_rewards(g.rewards, self.reward_model, "grpo.rewards")
        return micro, accum


# ------------------------------------------------------------------ GRPO's part of the loop
def grpo_loss_fn(g: GRPOSection):
    """train_step's loss_fn: batch {"idx", "targets", "mask", "old_logps", "advantages" (B,), ["ref_logps"],
    "loss_tokens"} -> grpo_loss on the policy's per-token log-probs (B, T)."""

    def loss_fn(model: nn.Module, batch: dict):
        logps = sequence_logprobs(model, batch["idx"], batch["targets"])  # (B, T), with gradients
        return grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], batch["mask"],
                         clip_eps=g.clip_eps, beta=g.beta, per_sequence=g.per_sequence,
                         n_tokens=None if g.per_sequence else batch["loss_tokens"])

    return loss_fn


def grpo_algorithm(g: GRPOSection):
    """make(model, device) -> Algorithm: the policy trains alone; advantages are the rewards standardised
    within each prompt's group of G completions, one per completion (broadcast over its tokens by the loss)."""

    def make(model: nn.Module, device) -> Algorithm:
        def advantages(r, score: torch.Tensor, ref, micro: int, autocast) -> tuple[dict, dict]:
            groups = score.view(g.prompts_per_step, g.group_size)  # rows are prompt-major
            per_row = {"advantages": group_advantages(groups).view(-1), **({"ref_logps": ref} if ref is not None else {})}
            no_signal = float((groups.max(1).values == groups.min(1).values).float().mean())
            return per_row, {"no_signal_groups": no_signal}

        return Algorithm(model, grpo_loss_fn(g), advantages, uses_reference=g.beta > 0)

    return make


def grpo(cfg: GRPOConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False,
         force: bool = False, resume: bool | str = False, rewards: dict | None = None) -> dict:
    """Train with GRPO and write cfg.train.out_dir; returns the summary (also in grpo.json).
    `model`/`tokenizer` may be given directly (tests); otherwise cfg.model is loaded. `rewards`: {name:
    function (completion, example) -> float} to use instead of the named ones in cfg.grpo.rewards. One process."""
    return train_rl(cfg, cfg.grpo, "grpo", grpo_algorithm(cfg.grpo), model, tokenizer, quiet, force, resume, rewards)
