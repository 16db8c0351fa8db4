"""The loop of the on-policy RL recipes (GRPO, PPO), written once. Each iteration is

    rollout     P prompts x G sampled completions (inference engine, KV cache) + old log-probs
    score       the reward sources (llmkit.align.rewards: verifiable checks, a reward model), summed per completion
    reference   per-token log-probs of the reference policy (adapter off, or a frozen copy), when the method uses one
    advantages  the method's own step (`Algorithm.advantages`): GRPO's group normalisation, PPO's values + GAE
    update      `epochs` passes over the P·G rows in shuffled minibatches of train.batch_size rows, each one
                `train_step` with the method's loss_fn
    log         metrics.jsonl (+ greedy held-out rewards every eval_every iterations)
    checkpoint  every train.ckpt_every iterations into OUT.partial/checkpoints: the trainable tensors (adapter,
                value head), the optimiser, the RNG, the prompt stream's position, the update shuffler and the
                method's state (PPO's KL coefficient); `--resume` continues exactly, as if never stopped

A method is an `Algorithm` record built by a `make(model, device)` function: what trains, its loss, its
advantages, its resumable state and the files it writes beside the adapter. A non-finite reward, loss or
gradient stops the run with a one-line error naming the iteration; step checkpoints are written only after
finite iterations, so the last one is good and `--resume` continues from it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..align.rewards import batch_rewards, get_rewards, reward_names
from ..align.rollout import Rollout, batched_logprobs, sample_rollouts
from ..align.tasks import SYSTEM, TOY, chat_prompt, load_prompts, toy_arithmetic
from ..devices import resolve_device
from ..errors import LLMKitError
from ..inference import SamplingParams, generate_batch
from ..io import atomic_path, locks_run_dir
from ..peft import apply_method as apply_peft_method
from ..peft import can_disable, disabled, get_method, trainable_summary
from ..train import checkpoint as ckpt
from ..train.dist import DistInfo
from ..train.loop import MetricsLogger, autocast_context, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .common import finish_run, load_base, restore, seed_torch, start_point, stop_if_not_finite, write_model
from .config import DataSection, every

log = logging.getLogger(__name__)


@dataclass
class PromptDataSection(DataSection):
    # prompt files: JSONL/JSON(.gz) rows with question + answer (verifiable rewards), plain {"prompt": ...} rows
    # or preference records (their prompts, for a reward model to score), or "toy-arithmetic"
    files: list[str] = field(default_factory=list)
    toy_size: int = 2000  # problems generated for toy-arithmetic
    val_prompts: int = 32  # held out for the greedy evaluation of the rewards
    max_records: int | None = None  # per file, for quick runs
    system: str | None = SYSTEM  # system prompt asking for <think>…</think> then the answer (null: none)
    prefill: str = "<think>"  # the answer's start, written into the prompt; rewards see prefill + completion


# ------------------------------------------------------------------ data
def load_prompt_rows(d: PromptDataSection, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of {"question", "answer", ["messages"]}: the files, or the generated toy task."""
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


def fitting_prompts(rows: list[dict], tokenizer, d: PromptDataSection, max_new_tokens: int, limit: int,
                    what: str) -> list[dict]:
    """The rows whose chat prompt + max_new_tokens fit `limit` tokens; the others are dropped and counted
    (a handled event: long preference prompts are common); none left is an error."""
    keep = [r for r in rows if len(chat_prompt(tokenizer, r, d.system, d.prefill)) + max_new_tokens <= limit]
    if rows and not keep:
        raise LLMKitError(f"no {what} prompt + max_new_tokens {max_new_tokens} fits {limit} tokens (data.seq_len / "
                          f"the model's context): raise data.seq_len or lower max_new_tokens")
    if len(keep) < len(rows):
        log.warning("dropped %d of %d %s prompts longer than %d - max_new_tokens %d tokens",
                    len(rows) - len(keep), len(rows), what, limit, max_new_tokens)
    return keep


def resolve_rewards(spec: str, reward_model: str | None, key: str) -> str:
    """A method section's `rewards` made explicit and checked (nothing loaded): "auto" is "rm" when a
    reward model is given (--reward-model), else the verifiable "correct,format"; a reward model that no
    reward uses, or "rm" without one, is a one-line error."""
    if spec == "auto":
        spec = "rm" if reward_model else "correct,format"
    names = reward_names(spec)
    if reward_model and "rm" not in names:
        raise LLMKitError(f"--reward-model is given but {key}={spec} does not use it: add rm ({key}=rm or "
                          f"{key}=rm,format)")
    if "rm" in names and not reward_model:
        raise LLMKitError(f"{key}={spec} scores with a reward model: give --reward-model DIR")
    return spec


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


# ------------------------------------------------------------------ rewards and evaluation
def score_completions(texts: list[str], rows: list[dict], reward_fns: dict, where: str = "",
                      ckpt_root: Path | None = None) -> dict[str, torch.Tensor]:
    """{reward name: (N,) float tensor}; a value that is not a finite number stops the run (names the
    iteration `where` and the completion)."""
    out = {}
    for name, fn in reward_fns.items():
        vals = batch_rewards(fn, texts, rows)
        for i, v in enumerate(vals):
            stop_if_not_finite({f"reward {name}": v}, f"{where + ', ' if where else ''}completion {i}", ckpt_root,
                               "rewards must be finite numbers")
        out[name] = torch.tensor(vals)
    return out


@torch.no_grad()
def evaluate_rewards(model: nn.Module, tokenizer, rows: list[dict], reward_fns: dict, system: str | None,
                     max_new_tokens: int, prefill: str = "", batch: int = 16, where: str = "",
                     ckpt_root: Path | None = None) -> dict[str, float]:
    """Greedy answers to `rows`: the mean of each reward (reward_correct = accuracy, reward_format = format rate)."""
    was = model.training
    model.eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,))
    texts = []
    for i in range(0, len(rows), batch):
        gens = generate_batch(model, [chat_prompt(tokenizer, r, system, prefill) for r in rows[i:i + batch]], params)
        texts += [prefill + tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
    model.train(was)
    scores = score_completions(texts, rows, reward_fns, where, ckpt_root)
    return {f"reward_{k}": float(v.mean()) for k, v in scores.items()}


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
    ax_kl.set_ylabel("KL")
    ax_kl.set_xlabel("iteration")
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_png)


# ------------------------------------------------------------------ updates
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


class RLProgress:
    """Where the run is, beyond weights and optimiser: prompts drawn from the stream, the update shuffler's
    generator, optimiser steps taken, Python's RNG. Resumable (`state_dict` / `load_state_dict`): the
    stream is replayed to its position."""

    def __init__(self, rows: list[dict], seed: int):
        self.stream = prompt_stream(rows, seed)
        self.drawn = 0
        self.gen = torch.Generator().manual_seed(seed)  # minibatch order of the updates
        self.opt_step = 0

    def next_rows(self, n: int) -> list[dict]:
        self.drawn += n
        return [next(self.stream) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "gen": self.gen.get_state(), "opt_step": self.opt_step,
                "python_rng": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(state["drawn"] - self.drawn):
            next(self.stream)
        self.drawn = state["drawn"]
        self.gen.set_state(state["gen"])
        self.opt_step = state["opt_step"]
        random.setstate(state["python_rng"])


# ------------------------------------------------------------------ the loop
@dataclass
class Algorithm:
    """What one RL method brings to the shared loop (`train_rl`)."""

    trainable: nn.Module  # what the optimiser trains and the step checkpoints hold (the policy, + a value head)
    loss_fn: Callable  # train_step's loss_fn(trainable, batch) -> (loss, metrics)
    # (rollout, score (N,), reference log-probs (N, T) or None, micro, autocast) -> (per-row tensors for the
    # loss batches, fields for the iteration's metrics record)
    advantages: Callable
    uses_reference: bool = True  # whether the loop computes π_ref's log-probs
    state: Callable[[], dict] = dict  # its resumable state (PPO: the KL coefficient), saved in checkpoints
    load_state: Callable[[dict], None] = lambda s: None
    save: Callable[[Path], None] = lambda out: None  # files beside the adapter (PPO: value_head.safetensors)


@locks_run_dir  # one writer per train.out_dir (and its .partial)
def train_rl(cfg, sec, name: str, make: Callable, model: nn.Module | None = None, tokenizer=None,
             quiet: bool = False, force: bool = False, resume: bool | str = False, rewards: dict | None = None) -> dict:
    """Train with the RL method `name` and write cfg.train.out_dir; returns the summary (also in NAME.json).

    cfg: the recipe's config (model, method, data, optim, train, [reward_model]); sec: its method section
    (group_size, prompts_per_step, max_new_tokens, temperature, [top_p], epochs, rewards); make(model, device)
    -> Algorithm, called once the PEFT method is applied. `model`/`tokenizer` may be given directly (tests);
    `rewards`: {name: function (completion, example) -> float} instead of the named ones in sec.rewards."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    micro, _ = cfg.validate()
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, DistInfo())  # one process
    seed_torch(t)
    if model is None:
        model, tokenizer = load_base(cfg.model)
    if tokenizer is None or tokenizer.eos_id is None:
        raise LLMKitError(f"model {cfg.model!r} needs a tokenizer with an eos token (chat prompts, end of answers)")
    device = resolve_device(t.device)
    # reward sources first: a reward model with another tokenizer fails here, before any work
    reward_fns = rewards if rewards is not None else get_rewards(
        sec.rewards, reward_model=getattr(cfg, "reward_model", None), tokenizer=tokenizer, device=device,
        batch_size=micro)
    train_rows, val_rows = load_prompt_rows(d, t.seed)
    limit = min(d.seq_len, model.max_tokens)
    train_rows = fitting_prompts(train_rows, tokenizer, d, sec.max_new_tokens, limit, "training")
    val_rows = fitting_prompts(val_rows, tokenizer, d, sec.max_new_tokens, limit, "held-out")

    apply_peft_method(model, cfg.method, cfg, tokenizer)
    model.to(device).train()
    algo: Algorithm = make(model, device)
    algo.trainable.to(device).train()
    reference = Reference(model).to(device) if algo.uses_reference else None
    params = trainable_summary(model)
    lr, min_lr = o.peak(get_method(cfg.method).default_lr)
    optimizer = OPTIMIZERS[o.name](algo.trainable, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(device, t.dtype)
    progress = RLProgress(train_rows, t.seed)
    start, state = restore(start_ckpt, algo.trainable, optimizer, progress)
    run = state.get("loader", {})
    if start_ckpt:
        algo.load_state(run["algorithm"])
    logger = MetricsLogger(partial / "metrics.jsonl", tensorboard=False, resume_step=start if start_ckpt else None)
    opt_steps = t.steps * sec.epochs * sec.prompts_per_step * sec.group_size // t.batch_size
    sampling = SamplingParams(temperature=sec.temperature, top_p=getattr(sec, "top_p", 1.0),
                              max_new_tokens=sec.max_new_tokens)

    def held_out(where: str) -> dict:
        return {f"eval_{k[len('reward_'):]}": v for k, v in
                evaluate_rewards(model, tokenizer, val_rows, reward_fns, d.system, sec.max_new_tokens, d.prefill,
                                 where=where, ckpt_root=ckpt_root).items()} if val_rows else {}

    before = run["before"] if start_ckpt else held_out("the evaluation before training")
    if before and not start_ckpt:
        logger.log({"step": 0, **before})
    last_eval, elapsed_before = run.get("last_eval", before), run.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start, enabled=not quiet and t.progress, desc=f"{name}[{cfg.method}]")
    t0 = time.perf_counter()
    for it in range(start + 1, t.steps + 1):
        rows = progress.next_rows(sec.prompts_per_step)
        prompts = [chat_prompt(tokenizer, row, d.system, d.prefill) for row in rows]
        r = sample_rollouts(model, tokenizer, prompts, sec.group_size,
                            dataclasses.replace(sampling, seed=t.seed * 100003 + it), micro_batch=micro,
                            autocast=autocast)
        scores = score_completions([d.prefill + x for x in r.texts], [rows[i] for i in r.prompt_index], reward_fns,
                                   f"iteration {it}", ckpt_root)
        score = sum(scores.values())  # (N,) prompt-major: row = prompt * G + sample
        ref = reference.logps(model, r.idx, r.targets, micro, autocast) if reference is not None else None
        per_row, fields = algo.advantages(r, score, ref, micro, autocast)
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(sec.epochs):
            for mbs in update_batches(r, per_row, t.batch_size, micro, progress.gen, device):
                cur = lr_at(progress.opt_step, max_lr=lr, total_steps=opt_steps,
                            warmup_steps=min(o.warmup_steps, opt_steps), min_lr=min_lr, kind=o.schedule)
                set_lr(optimizer, cur)
                stats = train_step(algo.trainable, optimizer, mbs, loss_fn=algo.loss_fn, grad_clip=o.grad_clip,
                                   autocast=autocast)
                stop_if_not_finite(stats, f"iteration {it} (optimiser step {progress.opt_step + 1})", ckpt_root,
                                   f"lower optim.lr ({lr})")
                progress.opt_step += 1
                n_updates += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"step": it, "reward": float(score.mean()),
               **{f"reward_{k}": float(v.mean()) for k, v in scores.items()},
               **{k: v / n_updates for k, v in sums.items()}, **fields,
               "response_len": sum(r.lengths) / len(r.lengths),
               "truncated": r.finish.count("length") / len(r.finish),
               "lr": cur, "opt_steps": progress.opt_step, "elapsed_s": elapsed}
        if val_rows and (every(t.eval_every, it) or it == t.steps):
            last_eval = held_out(f"the evaluation at iteration {it}")
            rec.update(last_eval)
        if every(t.log_every, it) or it == t.steps or any(k.startswith("eval_") for k in rec):
            logger.log(rec)
        if every(t.ckpt_every, it) and it < t.steps:
            ckpt.save_train_state(ckpt_root, it, algo.trainable, optimizer,
                                  {**progress.state_dict(), "algorithm": algo.state(), "before": before,
                                   "last_eval": last_eval, "elapsed_s": elapsed},
                                  dataclasses.asdict(cfg), {"reward": rec["reward"]}, keep=t.keep_last,
                                  trainable_only=True)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", kl=f"{rec.get('kl', 0.0):.3f}")
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = elapsed_before + time.perf_counter() - t0

    model.eval()
    summary = {"method": name, "peft_method": cfg.method, "model": cfg.model, "data": d.files,
               "reward_model": getattr(cfg, "reward_model", None), "iterations": t.steps,
               "optimizer_steps": progress.opt_step, "train_prompts": len(train_rows), "val_prompts": len(val_rows),
               "trainable_params": params["trainable"], "total_params": params["total"],
               "before": before, "after": last_eval, "train_seconds": elapsed, **algo.state()}
    resolved = dataclasses.asdict(cfg)
    write_model(model, out, cfg.method, cfg.model, tokenizer, {name: resolved})
    algo.save(out)
    finish_run(out, partial, name, resolved, summary,
               lambda records: plot_rewards(records, out / "rewards.png", title=f"{name.upper()} ({cfg.method})"))
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"{s['method'].upper()} ({s['peft_method']}): {s['trainable_params']:,} trainable of "
             f"{s['total_params']:,} parameters",
             f"{s['iterations']} iterations, {s['optimizer_steps']} optimiser steps in {s['train_seconds']:.1f}s"]
    for k in s["before"]:
        lines.append(f"held-out {k[len('eval_'):]}: {s['before'][k]:.3f} -> {s['after'].get(k, float('nan')):.3f}")
    return lines
