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
adapter (or a checkpoint for full fine-tuning), metrics.jsonl, rewards.png and grpo.json.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..align.rewards import get_rewards
from ..align.rollout import Rollout, batched_logprobs, sample_rollouts
from ..align.tasks import SYSTEM, TOY, chat_prompt, load_prompts, toy_arithmetic
from ..devices import resolve_device
from ..errors import LLMKitError
from ..inference import SamplingParams, generate_batch
from ..io import atomic_path, atomic_write_json, check_overwrite
from ..losses import group_advantages, grpo_loss, sequence_logprobs
from ..peft import apply_method as apply_peft_method
from ..peft import PeftSections, can_disable, disabled, get_method, trainable_summary
from ..peft.lora import LoRAConfig
from ..train.loop import MetricsLogger, autocast_context, progress_bar, read_metrics, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .config import DataSection, OptimSection, TrainSection, check_inputs, check_sections, every
from .common import seed_torch, write_model


@dataclass
class GRPODataSection(DataSection):
    files: list[str] = field(default_factory=list)  # prompt JSONL files (question + answer), or "toy-arithmetic"
    toy_size: int = 2000  # problems generated for toy-arithmetic
    val_prompts: int = 32  # held out for the greedy accuracy / format-rate evaluation
    max_records: int | None = None  # per file, for quick runs
    system: str | None = SYSTEM  # system prompt asking for <think>…</think> then the answer
    prefill: str = "<think>"  # the answer's start, written into the prompt; rewards see prefill + completion


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
    rewards: str = "correct,format"  # reward functions summed (llmkit.align.rewards.REWARDS)


@dataclass
class GRPOConfig(PeftSections):  # + every PEFT method's section (lora:, adapter:, ...)
    model: str = ""
    method: str = "lora"  # any PEFT method of llmkit.peft (lora, full, ...)
    data: GRPODataSection = field(default_factory=lambda: GRPODataSection(seq_len=512))
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=0, weight_decay=0.0,
                                                                     schedule="constant"))
    # batch_size: completions per optimiser step (a minibatch of the rollout); steps: iterations (rollouts)
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=30, batch_size=16, seed=0, eval_every=0))
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
        get_rewards(g.rewards)
        return micro, accum


# ------------------------------------------------------------------ data
def load_prompt_rows(d: GRPODataSection, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"question", "answer"}: the files, or the generated toy task."""
    rows: list[dict] = []
    for f in d.files:
        rows += toy_arithmetic(d.toy_size, seed) if f == TOY else load_prompts(f, d.max_records)
    random.Random(seed).shuffle(rows)
    n_val = min(d.val_prompts, len(rows) // 5)
    if len(rows) - n_val < 1:
        raise LLMKitError(f"{len(rows)} prompts leave none to train on")
    return rows[n_val:], rows[:n_val]


def prompt_stream(rows: list[dict], seed: int):
    """Endless reshuffled passes over the rows (one seeded order per pass)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        yield from (rows[i] for i in order)


# ------------------------------------------------------------------ reference policy
class Reference:
    """The reference policy π_ref of the KL term: the policy as it was before training.

    When the policy's PEFT method can switch its adapter off (LoRA, QLoRA, bottleneck adapters:
    `llmkit.peft.disabled`), π_ref is the same model with the adapter off, so it costs no second copy
    of the weights. Otherwise (full or selective fine-tuning, prompt tuning, LLaMA-Adapter) it is a
    frozen copy taken before the first update (+1 copy of the weights in memory)."""

    def __init__(self, policy: nn.Module):  # the policy with its PEFT method already applied
        self.copy = None if can_disable(policy) else copy.deepcopy(policy).eval().requires_grad_(False)

    def to(self, device) -> "Reference":
        if self.copy is not None:
            self.copy.to(device)
        return self

    def logps(self, policy: nn.Module, idx: torch.Tensor, targets: torch.Tensor, micro_batch: int,
              autocast=None) -> torch.Tensor:
        if self.copy is not None:
            return batched_logprobs(self.copy, idx, targets, micro_batch, autocast)
        with disabled(policy):
            return batched_logprobs(policy, idx, targets, micro_batch, autocast)


# ------------------------------------------------------------------ loss and evaluation
def grpo_loss_fn(g: GRPOSection):
    """train_step's loss_fn: batch {"idx", "targets", "mask", "old_logps", "advantages" (B,), ["ref_logps"],
    "loss_tokens"} -> grpo_loss on the policy's per-token log-probs (B, T)."""

    def loss_fn(model: nn.Module, batch: dict):
        logps = sequence_logprobs(model, batch["idx"], batch["targets"])  # (B, T), with gradients
        return grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], batch["mask"],
                         clip_eps=g.clip_eps, beta=g.beta, per_sequence=g.per_sequence,
                         n_tokens=None if g.per_sequence else batch["loss_tokens"])

    return loss_fn


def score_completions(texts: list[str], rows: list[dict], reward_fns: dict) -> dict[str, torch.Tensor]:
    """{reward name: (N,) float tensor}; a reward that is not a finite number raises (names the row)."""
    out = {}
    for name, fn in reward_fns.items():
        vals = [float(fn(t, r)) for t, r in zip(texts, rows)]
        bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
        if bad:
            raise LLMKitError(f"reward {name} returned {vals[bad[0]]} for completion {bad[0]}: rewards must be finite")
        out[name] = torch.tensor(vals)
    return out


@torch.no_grad()
def evaluate_rewards(model: nn.Module, tokenizer, rows: list[dict], reward_fns: dict, system: str | None,
                     max_new_tokens: int, prefill: str = "", batch: int = 16) -> dict[str, float]:
    """Greedy answers to `rows`: the mean of each reward (reward_correct = accuracy, reward_format = format rate)."""
    was = model.training
    model.eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,))
    texts = []
    for i in range(0, len(rows), batch):
        gens = generate_batch(model, [chat_prompt(tokenizer, r, system, prefill) for r in rows[i:i + batch]], params)
        texts += [prefill + tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
    model.train(was)
    return {f"reward_{k}": float(v.mean()) for k, v in score_completions(texts, rows, reward_fns).items()}


def plot_rewards(records: list[dict], out_png: str | Path, title: str = "GRPO") -> Path:
    """Mean reward (and each reward's mean, held-out greedy accuracy) and KL against the iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    fig, (ax, ax_kl) = plt.subplots(2, 1, figsize=(7, 6), height_ratios=[3, 1], sharex=True)
    for key in ["reward"] + sorted({k for r in train for k in r if k.startswith("reward_")}):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1, label=key)
    for key in sorted({k for r in evals for k in r if k.startswith("eval_")}):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o--", ms=4, label=key)
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_kl.plot([r["step"] for r in train], [r.get("kl", 0.0) for r in train], color="gray")
    ax_kl.set_ylabel("KL (k3)")
    ax_kl.set_xlabel("iteration")
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_png)


# ------------------------------------------------------------------ the run
def update_batches(r: Rollout, per_row: dict[str, torch.Tensor], batch_size: int, micro: int,
                   gen: torch.Generator, device) -> list[list[dict]]:
    """One epoch over the rollout: shuffled minibatches of batch_size rows, each as micro-batches of the
    rollout's tensors plus `per_row`'s (advantages, reference log-probs, values...: first dim = rows), carrying
    loss_tokens = the minibatch's completion tokens / micro-batches (the token mean over the minibatch)."""
    perm = torch.randperm(r.idx.size(0), generator=gen)
    steps = []
    for s in range(0, len(perm), batch_size):
        rows = perm[s:s + batch_size]
        n_micro = math.ceil(len(rows) / micro)
        share = float(r.mask[rows].sum()) / n_micro
        mbs = []
        for m in range(0, len(rows), micro):
            sel = rows[m:m + micro]
            b = {**r.rows(sel), **{k: v[sel] for k, v in per_row.items()}, "loss_tokens": share}
            mbs.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
        steps.append(mbs)
    return steps


def rl_start(cfg, model: nn.Module | None, tokenizer, force: bool, max_new_tokens: int, section: str):
    """What the RL recipes (GRPO, PPO) do before their loop: claim OUT (OUT.partial holds the metrics until
    the result is written), seed, load the model unless given, read the prompts, and check that the longest
    chat prompt plus `max_new_tokens` fits. -> (out, partial, model, tokenizer, device, train rows, val rows)."""
    t, d = cfg.train, cfg.data
    out = Path(t.out_dir)
    partial = out.with_name(out.name + ".partial")
    check_overwrite(out, force)
    if partial.exists():
        shutil.rmtree(partial)
    seed_torch(t)
    if model is None:
        from ..loading import load_model

        model, tokenizer = load_model(cfg.model)
    if tokenizer is None or tokenizer.eos_id is None:
        raise LLMKitError(f"model {cfg.model!r} needs a tokenizer with an eos token (chat prompts, end of answers)")
    train_rows, val_rows = load_prompt_rows(d, t.seed)
    longest = max(len(chat_prompt(tokenizer, r, d.system, d.prefill)) for r in train_rows + val_rows)
    if longest + max_new_tokens > min(d.seq_len, model.max_tokens):
        raise LLMKitError(f"a prompt of {longest} tokens + {section}.max_new_tokens {max_new_tokens} does not fit "
                          f"data.seq_len {d.seq_len} / the model's {model.max_tokens} tokens")
    return out, partial, model, tokenizer, resolve_device(t.device), train_rows, val_rows


def grpo(cfg: GRPOConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False,
         force: bool = False, rewards: dict | None = None) -> dict:
    """Train with GRPO and write cfg.train.out_dir; returns the summary (also in grpo.json).
    `model`/`tokenizer` may be given directly (tests); otherwise cfg.model is loaded. `rewards`: {name:
    function (completion, example) -> float} to use instead of the named ones in cfg.grpo.rewards. One process."""
    t, g, d, o = cfg.train, cfg.grpo, cfg.data, cfg.optim
    micro, _ = cfg.validate()
    reward_fns = rewards if rewards is not None else get_rewards(g.rewards)
    out, partial, model, tokenizer, device, train_rows, val_rows = rl_start(cfg, model, tokenizer, force,
                                                                            g.max_new_tokens, "grpo")

    apply_peft_method(model, cfg.method, cfg, tokenizer)
    model.to(device).train()
    reference = Reference(model).to(device) if g.beta > 0 else None
    params = trainable_summary(model)
    lr, min_lr = o.peak(get_method(cfg.method).default_lr)
    optimizer = OPTIMIZERS[o.name](model, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(device, t.dtype)
    logger = MetricsLogger(partial / "metrics.jsonl", tensorboard=False)
    loss_fn = grpo_loss_fn(g)
    stream = prompt_stream(train_rows, t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    rows_per_rollout = g.prompts_per_step * g.group_size
    opt_steps = t.steps * g.epochs * rows_per_rollout // t.batch_size
    sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens)

    def held_out() -> dict:
        return {f"eval_{k[len('reward_'):]}": v for k, v in
                evaluate_rewards(model, tokenizer, val_rows, reward_fns, d.system, g.max_new_tokens,
                                 d.prefill).items()} \
            if val_rows else {}

    before = held_out()
    if before:
        logger.log({"step": 0, **before})
    last_eval = before
    bar = progress_bar(t.steps, 0, enabled=not quiet and t.progress, desc=f"grpo[{cfg.method}]")
    t0, opt_step = time.perf_counter(), 0
    for it in range(1, t.steps + 1):
        rows = [next(stream) for _ in range(g.prompts_per_step)]
        prompts = [chat_prompt(tokenizer, r, d.system, d.prefill) for r in rows]
        r = sample_rollouts(model, tokenizer, prompts, g.group_size,
                            dataclasses.replace(sampling, seed=t.seed * 100003 + it), micro_batch=micro,
                            autocast=autocast)
        scores = score_completions([d.prefill + x for x in r.texts], [rows[i] for i in r.prompt_index], reward_fns)
        total = sum(scores.values())  # (N,) prompt-major: row = prompt * G + sample
        adv = group_advantages(total.view(g.prompts_per_step, g.group_size)).view(-1)
        ref = reference.logps(model, r.idx, r.targets, micro, autocast) if reference is not None else None
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(g.epochs):
            per_row = {"advantages": adv, **({"ref_logps": ref} if ref is not None else {})}
            for mbs in update_batches(r, per_row, t.batch_size, micro, gen, device):
                cur = lr_at(opt_step, max_lr=lr, total_steps=opt_steps, warmup_steps=min(o.warmup_steps, opt_steps),
                            min_lr=min_lr, kind=o.schedule)
                set_lr(optimizer, cur)
                stats = train_step(model, optimizer, mbs, loss_fn=loss_fn, grad_clip=o.grad_clip, autocast=autocast)
                if not all(math.isfinite(v) for v in stats.values()):
                    raise LLMKitError(f"GRPO loss or gradient became non-finite at iteration {it} "
                                      f"(optimiser step {opt_step + 1}): {stats}; lower optim.lr (={lr})")
                opt_step += 1
                n_updates += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        groups = total.view(g.prompts_per_step, g.group_size)
        rec = {"step": it, "reward": float(total.mean()),
               **{f"reward_{k}": float(v.mean()) for k, v in scores.items()},
               **{k: v / n_updates for k, v in sums.items()},
               "response_len": sum(r.lengths) / len(r.lengths),
               "truncated": r.finish.count("length") / len(r.finish),
               "no_signal_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
               "lr": cur, "opt_steps": opt_step, "elapsed_s": time.perf_counter() - t0}
        if val_rows and (every(t.eval_every, it) or it == t.steps):
            last_eval = held_out()
            rec.update(last_eval)
        if every(t.log_every, it) or it == t.steps or any(k.startswith("eval_") for k in rec):
            logger.log(rec)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec.get('kl', 0.0):.3f}")
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = time.perf_counter() - t0

    model.eval()
    summary = {"method": "grpo", "peft_method": cfg.method, "model": cfg.model, "data": d.files,
               "iterations": t.steps, "optimizer_steps": opt_step, "train_prompts": len(train_rows),
               "val_prompts": len(val_rows), "trainable_params": params["trainable"], "total_params": params["total"],
               "before": before, "after": last_eval, "train_seconds": elapsed}
    resolved = dataclasses.asdict(cfg)
    write_model(model, out, cfg.method, cfg.model, tokenizer, {"grpo": resolved})
    os.replace(partial / "metrics.jsonl", out / "metrics.jsonl")
    plot_rewards(read_metrics(out / "metrics.jsonl"), out / "rewards.png", title=f"GRPO ({cfg.method})")
    atomic_write_json(out / "grpo.json", {"config": resolved, "summary": summary})
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"GRPO ({s['peft_method']}): {s['trainable_params']:,} trainable of {s['total_params']:,} parameters",
             f"{s['iterations']} iterations, {s['optimizer_steps']} optimiser steps in {s['train_seconds']:.1f}s"]
    for k in s["before"]:
        lines.append(f"held-out {k[len('eval_'):]}: {s['before'][k]:.3f} -> {s['after'].get(k, float('nan')):.3f}")
    return lines
