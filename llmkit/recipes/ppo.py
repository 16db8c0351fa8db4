"""PPO for RLHF (Ouyang et al. 2022, InstructGPT; Schulman et al. 2017; the N+ implementation details of
Huang et al. 2024): a policy with a value head, rollouts from the inference engine, a per-token KL penalty to
the reference, GAE, and several epochs of clipped updates per rollout. One explicit loop; each iteration is

    rollout     P prompts x G completions (llmkit.align.rollout) + old log-probs
    score       the reward of each completion (the reward functions; a reward model plugs in as one)
    rewards     per token: -β (log π - log π_ref) on every response token, + the score on the last one
    values      the value head on the rollout (no grad); GAE(γ, λ) -> advantages (whitened) and returns
    update      `epochs` passes in shuffled minibatches, each a `train_step` with loss_fn = ppo_losses

The value head is one linear layer on the decoder's final hidden states (B, T, C) -> (B, T), trained with
the adapter (`PolicyWithValue`); it is saved beside the adapter as value_head.safetensors. The prompt
data, reference policy, evaluation and plots are GRPO's (recipes/grpo.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..align.rewards import get_rewards
from ..align.rollout import sample_rollouts
from ..align.tasks import TOY, chat_prompt
from ..errors import LLMKitError
from ..inference import SamplingParams
from ..io import atomic_path, atomic_write_json
from ..losses import entropy_from_logits, gae, gather_logprobs, masked_mean, ppo_losses
from ..peft import apply_method as apply_peft_method
from ..peft import PeftSections, get_method, trainable_summary
from ..peft.lora import LoRAConfig
from ..train.loop import MetricsLogger, autocast_context, progress_bar, read_metrics, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .config import OptimSection, TrainSection, check_inputs, check_sections, every
from .common import write_model
from .grpo import (GRPODataSection, Reference, evaluate_rewards, plot_rewards, prompt_stream, rl_start,
                   score_completions, update_batches)


@dataclass
class PPOSection:
    group_size: int = 2  # completions per prompt
    prompts_per_step: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    kl_coef: float = 0.05  # β of the per-token KL penalty in the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    epochs: int = 4  # passes over each rollout
    whiten: bool = True  # standardise the advantages over the rollout's response tokens
    rewards: str = "correct,format"  # reward functions summed into the score


@dataclass
class PPOConfig(PeftSections):  # + every PEFT method's section (lora:, adapter:, ...)
    model: str = ""
    reward_model: str | None = None  # --reward-model: not wired on this branch (see ppo())
    method: str = "lora"
    data: GRPODataSection = field(default_factory=lambda: GRPODataSection(seq_len=512))
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=0, weight_decay=0.0,
                                                                     schedule="constant"))
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=30, batch_size=8, seed=0, eval_every=0))
    ppo: PPOSection = field(default_factory=PPOSection)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(dropout=0.0))

    def validate(self) -> tuple[int, int]:
        get_method(self.method)
        check_inputs(self, f"--data FILE.jsonl, or --data {TOY}")
        if self.reward_model:
            raise LLMKitError("--reward-model is not wired into PPO yet; use verifiable rewards (ppo.rewards=...)")
        micro, accum = check_sections(self.data, self.optim, self.train, 1)
        p = self.ppo
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "epochs"):
            if getattr(p, name) < 1:
                raise LLMKitError(f"ppo.{name} must be >= 1, got {getattr(p, name)}")
        if not p.temperature > 0 or p.kl_coef < 0 or not 0 < p.clip_eps < 1:
            raise LLMKitError(f"ppo.temperature must be > 0, ppo.kl_coef >= 0 and ppo.clip_eps in (0, 1) "
                              f"(got {p.temperature}, {p.kl_coef}, {p.clip_eps})")
        rows = p.prompts_per_step * p.group_size
        if rows % self.train.batch_size:
            raise LLMKitError(f"a rollout of {rows} completions (ppo.prompts_per_step x ppo.group_size) must split "
                              f"into minibatches of train.batch_size {self.train.batch_size}")
        get_rewards(p.rewards)
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


def ppo(cfg: PPOConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False, force: bool = False,
        rewards: dict | None = None) -> dict:
    """Train with PPO and write cfg.train.out_dir; returns the summary (also in ppo.json). `rewards`:
    {name: function (completion, example) -> float} instead of cfg.ppo.rewards (e.g. a reward model's score)."""
    t, p, d, o = cfg.train, cfg.ppo, cfg.data, cfg.optim
    micro, _ = cfg.validate()
    reward_fns = rewards if rewards is not None else get_rewards(p.rewards)
    out, partial, model, tokenizer, device, train_rows, val_rows = rl_start(cfg, model, tokenizer, force,
                                                                            p.max_new_tokens, "ppo")
    apply_peft_method(model, cfg.method, cfg, tokenizer)
    pv = PolicyWithValue(model).to(device).train()
    reference = Reference(model).to(device) if p.kl_coef > 0 else None
    params = trainable_summary(model)
    lr, min_lr = o.peak(get_method(cfg.method).default_lr)
    optimizer = OPTIMIZERS[o.name](pv, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(device, t.dtype)
    logger = MetricsLogger(partial / "metrics.jsonl", tensorboard=False)
    loss_fn = ppo_loss_fn(p)
    stream = prompt_stream(train_rows, t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    opt_steps = t.steps * p.epochs * p.prompts_per_step * p.group_size // t.batch_size
    sampling = SamplingParams(temperature=p.temperature, max_new_tokens=p.max_new_tokens)

    def held_out() -> dict:
        return {f"eval_{k[len('reward_'):]}": v for k, v in
                evaluate_rewards(model, tokenizer, val_rows, reward_fns, d.system, p.max_new_tokens,
                                 d.prefill).items()} if val_rows else {}

    before = last_eval = held_out()
    if before:
        logger.log({"step": 0, **before})
    bar = progress_bar(t.steps, 0, enabled=not quiet and t.progress, desc=f"ppo[{cfg.method}]")
    t0, opt_step = time.perf_counter(), 0
    for it in range(1, t.steps + 1):
        rows = [next(stream) for _ in range(p.prompts_per_step)]
        prompts = [chat_prompt(tokenizer, r, d.system, d.prefill) for r in rows]
        r = sample_rollouts(model, tokenizer, prompts, p.group_size,
                            dataclasses.replace(sampling, seed=t.seed * 100003 + it), micro_batch=micro,
                            autocast=autocast)
        scores = score_completions([d.prefill + x for x in r.texts], [rows[i] for i in r.prompt_index], reward_fns)
        score = sum(scores.values())  # (N,)
        ref = reference.logps(model, r.idx, r.targets, micro, autocast) if reference is not None else None
        pv.eval()
        old_values = rollout_values(pv, r.idx, micro) * r.mask
        pv.train()
        tok_rewards, kl = token_rewards(score, r.old_logps, ref, r.mask, p.kl_coef)
        adv, returns = gae(tok_rewards, old_values, r.mask, p.gamma, p.lam)
        if p.whiten:  # Huang et al. 2024 detail: standardise over the response tokens of the rollout
            mu, var = masked_mean(adv, r.mask), masked_mean((adv - masked_mean(adv, r.mask)) ** 2, r.mask)
            adv = (adv - mu) / (var.sqrt() + 1e-8) * r.mask
        per_row = {"advantages": adv, "returns": returns, "old_values": old_values}
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(p.epochs):
            for mbs in update_batches(r, per_row, t.batch_size, micro, gen, device):
                cur = lr_at(opt_step, max_lr=lr, total_steps=opt_steps, warmup_steps=min(o.warmup_steps, opt_steps),
                            min_lr=min_lr, kind=o.schedule)
                set_lr(optimizer, cur)
                stats = train_step(pv, optimizer, mbs, loss_fn=loss_fn, grad_clip=o.grad_clip, autocast=autocast)
                if not all(math.isfinite(v) for v in stats.values()):
                    raise LLMKitError(f"PPO loss or gradient became non-finite at iteration {it} "
                                      f"(optimiser step {opt_step + 1}): {stats}; lower optim.lr (={lr})")
                opt_step += 1
                n_updates += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        rec = {"step": it, "reward": float(score.mean()), **{f"reward_{k}": float(v.mean()) for k, v in scores.items()},
               "kl": float(kl.sum(1).mean()),  # per sequence, summed over its tokens (k1)
               **{k: v / n_updates for k, v in sums.items()},
               "response_len": sum(r.lengths) / len(r.lengths), "lr": cur, "opt_steps": opt_step,
               "elapsed_s": time.perf_counter() - t0}
        if val_rows and (every(t.eval_every, it) or it == t.steps):
            last_eval = held_out()
            rec.update(last_eval)
        if every(t.log_every, it) or it == t.steps or any(k.startswith("eval_") for k in rec):
            logger.log(rec)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec['kl']:.3f}")
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = time.perf_counter() - t0

    model.eval()
    summary = {"method": "ppo", "peft_method": cfg.method, "model": cfg.model, "data": d.files,
               "iterations": t.steps, "optimizer_steps": opt_step, "train_prompts": len(train_rows),
               "val_prompts": len(val_rows), "trainable_params": params["trainable"], "total_params": params["total"],
               "before": before, "after": last_eval, "train_seconds": elapsed}
    resolved = dataclasses.asdict(cfg)
    write_model(model, out, cfg.method, cfg.model, tokenizer, {"ppo": resolved})
    from safetensors.torch import save_file

    with atomic_path(out / "value_head.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in pv.value_head.state_dict().items()}, str(tmp))
    os.replace(partial / "metrics.jsonl", out / "metrics.jsonl")
    plot_rewards(read_metrics(out / "metrics.jsonl"), out / "rewards.png", title=f"PPO ({cfg.method})")
    atomic_write_json(out / "ppo.json", {"config": resolved, "summary": summary})
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"PPO ({s['peft_method']}): {s['trainable_params']:,} trainable of {s['total_params']:,} parameters",
             f"{s['iterations']} iterations, {s['optimizer_steps']} optimiser steps in {s['train_seconds']:.1f}s"]
    for k in s["before"]:
        lines.append(f"held-out {k[len('eval_'):]}: {s['before'][k]:.3f} -> {s['after'].get(k, float('nan')):.3f}")
    return lines
