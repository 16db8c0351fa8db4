"""Preference optimisation recipe: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference
pairs, with any fine-tuning method (LoRA by default, full weights when asked).

    cfg = load_config(DPOConfig, None, ["model=smollm2-135m-instruct", "data.files=[pairs.json]",
                                        "loss_type=ipo", "beta=0.1", "train.steps=200"])
    train_dpo(cfg)

Each step scores the batch's 2B responses (B chosen, B rejected; prompt tokens masked) under the
policy with `losses.sequence_logprobs` and under the reference, and hands the four (B,) log-prob
vectors to the objective's pure loss (losses.dpo_loss / ipo_loss) as train_step's loss_fn.

The reference costs no second copy of the model:
  adapter     the policy itself with its adapter switched off (`llmkit.peft.disabled`): an adapter
              starts as the identity, so this is exactly the model before training (LoRA, QLoRA,
              bottleneck adapters); one extra no-grad forward per step.
  precomputed every pair's reference log-probs are computed once before training, by the model as
              it is then, and travel with the batches (any method, full fine-tuning included).
  auto        adapter when the method can switch off, else precomputed.

The loop, resume, output layout (OUT: the adapter or a checkpoint, metrics.jsonl, loss.png,
rewards.png, dpo.json; OUT.partial/ while running) are the fine-tuning recipe's, through its shared
pieces (llmkit/recipes/common.py) and llmkit.train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial as bind
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..align.data import load_preference_data, preference_batch
from ..errors import LLMKitError, closest
from ..finetune.data import IGNORE, example_stream
from ..io import atomic_path, locks_run_dir
from ..losses import dpo_loss, ipo_loss, sequence_logprobs
from ..peft import PeftSections, apply_method, can_disable, disabled, get_method, trainable_summary
from ..train import checkpoint as ckpt
from ..train.dist import DistInfo, all_reduce_sum, init_distributed, unwrap, wrap_model
from ..train.loop import MetricsLogger, autocast_context, plot_metrics, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .config import DataSection, OptimSection, TrainSection, check_inputs, check_sections, every
from .common import finish_run, load_base, restore, seed_torch, start_point, stop_if_not_finite, write_model


@dataclass(frozen=True)
class Objective:
    """One preference loss: the pure function, and whether it takes per-token mean log-probs (IPO, as
    trl) rather than sums. The logged implicit rewards are β·(log π − log π_ref) of what the loss
    sees: per response for DPO, per token for IPO."""

    loss: Callable
    length_normalised: bool = False


OBJECTIVES = {"dpo": Objective(dpo_loss), "ipo": Objective(ipo_loss, length_normalised=True)}
REFERENCES = ("auto", "adapter", "precomputed")


@dataclass
class PreferenceDataSection(DataSection):
    files: list[str] = field(default_factory=list)  # --data FILE[,FILE...]
    val_fraction: float = 0.1
    max_val_examples: int = 200


@dataclass
class DPOConfig(PeftSections):
    model: str = ""  # --model
    base_adapter: str | None = None  # a LoRA merged into the model first (continue from an SFT adapter)
    loss_type: str = "dpo"  # dpo | ipo (llmkit align --method)
    beta: float = 0.1  # DPO's β (strength of the KL anchor to the reference); IPO's τ
    label_smoothing: float = 0.0  # conservative DPO's ε: the chance a preference label is flipped
    reference: str = "auto"  # auto | adapter | precomputed (see the module docstring)
    peft: str = "lora"  # the fine-tuning method (llmkit.peft registry): lora, qlora, full, ...
    data: PreferenceDataSection = field(default_factory=lambda: PreferenceDataSection(seq_len=512))
    # optim.lr None: the PEFT method's default learning rate
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=10, weight_decay=0.0))
    # train.batch_size preference pairs per optimiser step (2x as many sequences)
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=100, batch_size=4, seed=0, eval_every=50, ckpt_every=100, keep_last=2))
    # + the sections of every PEFT method (lora:, qlora:, adapter:, ...), from llmkit.peft.PeftSections

    def validate(self, world: int = 1) -> tuple[int, int]:
        method = get_method(self.peft)
        if self.loss_type not in OBJECTIVES:
            raise LLMKitError(f"loss_type {self.loss_type!r}{closest(self.loss_type, OBJECTIVES)} is not one of "
                              f"{', '.join(OBJECTIVES)}")
        if self.reference not in REFERENCES:
            raise LLMKitError(f"reference {self.reference!r} is not one of {', '.join(REFERENCES)}")
        if not self.beta > 0:
            raise LLMKitError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LLMKitError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_inputs(self)
        micro, accum = check_sections(self.data, self.optim, self.train, world)
        if world > 1 and self.train.strategy == "fsdp":  # the output gathering of finetune is not wired here
            raise LLMKitError("the preference recipe runs multi-process with train.strategy=ddp, not fsdp")
        if method.validate is not None:
            method.validate(self)
        return micro, accum


# ------------------------------------------------------------------ the loss_fn
def response_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(2B,) summed log-probability of each row's response tokens (targets != -100)."""
    return sequence_logprobs(model, batch["idx"], batch["targets"]).sum(-1)


def preference_loss(model: nn.Module, batch: dict, objective: Objective, beta: float,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """train_step's loss_fn. batch: idx/targets (2B, T) from preference_batch (rows [chosen; rejected]),
    and "ref_logps" (2B,) when the reference was precomputed; otherwise the reference is the policy
    with its adapter off (no gradient)."""
    policy = response_logps(model, batch)  # (2B,)
    ref = batch.get("ref_logps")
    if ref is None:
        inner = unwrap(model)  # the plain module: no DDP hooks for a no-grad forward
        with torch.no_grad(), disabled(inner):
            ref = response_logps(inner, batch)
    if objective.length_normalised:
        n = (batch["targets"] != IGNORE).sum(-1).clamp(min=1)  # (2B,) response tokens
        policy, ref = policy / n, ref / n
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return objective.loss(pc, pr, rc, rr, beta, label_smoothing)


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs, micro: int, pad_id: int, device) -> torch.Tensor:
    """(N, 2) summed reference log-probs (chosen, rejected) of every pair, by the model as it is now."""
    was = model.training
    model.eval()
    rows = []
    for i in range(0, len(pairs), micro):
        b = {k: v.to(device) for k, v in preference_batch(pairs[i:i + micro], pad_id).items()}
        rows.append(response_logps(model, b).view(2, -1).T.cpu())
    model.train(was)
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def make_batch(pairs, ref: torch.Tensor | None, pad_id: int) -> dict:
    """preference_batch plus, when precomputed, the pairs' reference log-probs ref (B, 2) as (2B,)."""
    b = preference_batch(pairs, pad_id)
    if ref is not None:
        b["ref_logps"] = ref.T.reshape(-1)  # [chosen..., rejected...], the rows' order
    return b


@torch.no_grad()
def evaluate_pairs(model: nn.Module, loss_fn, pairs, ref, micro: int, pad_id: int, device, autocast=None) -> dict:
    """Mean loss and reward metrics over held-out pairs (pair-weighted), prefixed val_."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(pairs), micro):
        chunk = pairs[i:i + micro]
        b = make_batch(chunk, ref[i:i + micro] if ref is not None else None, pad_id)
        with autocast or contextlib.nullcontext():
            _, m = loss_fn(model, {k: v.to(device) for k, v in b.items()})
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    model.train(was)
    return {f"val_{k}": v / len(pairs) for k, v in sums.items()}


class PairBatches:
    """The global batch of each step: B pair indices drawn from the endless shuffled stream (every rank
    draws the same and keeps its rows). Resumable: the state is the number of batches drawn."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.stream = example_stream([list(range(n))], [1.0], seed)
        self.drawn, self.B, self.rank, self.world = 0, batch_size, rank, world

    def next_indices(self) -> list[int]:
        self.drawn += 1
        g = [next(self.stream) for _ in range(self.B)]
        return g[self.rank * self.B // self.world:(self.rank + 1) * self.B // self.world]

    def state_dict(self) -> dict:
        return {"batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        while self.drawn < state["batches"]:
            self.next_indices()


def plot_rewards(records: list[dict], out_png: Path, title: str) -> Path:
    """Reward margin and reward accuracy (train per step, held-out when evaluated) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for ax, key in zip(axes, ("reward_margin", "reward_accuracy")):
        for k, style in ((key, "-"), (f"val_{key}", "o-")):
            pts = [(r["step"], r[k]) for r in records if k in r]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, lw=0.8, label=k)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title(title)
    axes[1].set_xlabel("step")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------ the run
@locks_run_dir  # one writer per train.out_dir (and its .partial)
def train_dpo(cfg: DPOConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False,
              resume: bool | str = False, force: bool = False) -> dict:
    """Train on preference pairs and write the result to cfg.train.out_dir (see the module docstring).
    `model`/`tokenizer` may be given directly (tests). Returns the summary (also in dpo.json)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    info: DistInfo = init_distributed(t.device)
    micro, accum = cfg.validate(info.world)
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, info)

    seed_torch(t)
    if model is None:
        model, tokenizer = load_base(cfg.model, cfg.base_adapter)
    if tokenizer is None:
        raise LLMKitError(f"model {cfg.model!r} comes without a tokenizer; preference data needs its chat template")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    data = load_preference_data(d.files, tokenizer, d.seq_len, d.val_fraction, t.seed)
    val = data.val[: d.max_val_examples]

    apply_method(model, cfg.peft, cfg, tokenizer)
    if d.seq_len > model.max_tokens:
        raise LLMKitError(f"data.seq_len {d.seq_len} does not fit the {model.max_tokens} tokens the model takes: "
                          f"set data.seq_len <= {model.max_tokens}")
    reference = cfg.reference
    if reference == "auto":
        reference = "adapter" if can_disable(model) else "precomputed"
    if reference == "adapter" and not can_disable(model):
        raise LLMKitError(f"reference=adapter needs a method whose adapter can be switched off; {cfg.peft} "
                          "cannot: use reference=precomputed")
    model.to(info.device)
    ref_train = ref_val = None
    if reference == "precomputed":  # before any step (and before a resumed state is loaded): the base model
        ref_train = precompute_reference(model, data.train, micro, pad_id, info.device)
        ref_val = precompute_reference(model, val, micro, pad_id, info.device)
    model.train()
    params = trainable_summary(model)
    model = wrap_model(model, t.strategy, info)
    lr, min_lr = o.peak(get_method(cfg.peft).default_lr)
    optimizer = OPTIMIZERS[o.name](model, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(info.device, t.dtype)
    loss_fn = bind(preference_loss, objective=OBJECTIVES[cfg.loss_type], beta=cfg.beta,
                   label_smoothing=cfg.label_smoothing)
    batches = PairBatches(len(data.train), t.batch_size, t.seed, info.rank, info.world)

    start_step, state = restore(start_ckpt, model, optimizer, batches)
    logger = MetricsLogger(partial / "metrics.jsonl", enabled=info.is_main, tensorboard=False,
                           resume_step=start_step if start_ckpt else None)

    def validation() -> dict:
        return evaluate_pairs(model, loss_fn, val, ref_val, micro, pad_id, info.device, autocast) if val else {}

    run = state.get("loader", {})
    val_before = run["val_before"] if start_ckpt else validation()
    if val_before and not start_ckpt:
        logger.log({"step": 0, **val_before})
    last_val, elapsed_before = run.get("last_val", val_before), run.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start_step, enabled=not quiet and t.progress and info.is_main,
                       desc=f"align[{cfg.loss_type}]")
    t0 = time.perf_counter()
    for step in range(start_step + 1, t.steps + 1):
        cur = lr_at(step - 1, max_lr=lr, total_steps=t.steps, warmup_steps=min(o.warmup_steps, t.steps),
                    min_lr=min_lr, kind=o.schedule)
        set_lr(optimizer, cur)
        mine = batches.next_indices()
        micro_batches = [make_batch([data.train[j] for j in mine[i:i + micro]],
                                    ref_train[mine[i:i + micro]] if ref_train is not None else None, pad_id)
                         for i in range(0, len(mine), micro)]
        micro_batches = [{k: v.to(info.device) for k, v in b.items()} for b in micro_batches]
        stats = train_step(model, optimizer, micro_batches, loss_fn=loss_fn, grad_clip=o.grad_clip, autocast=autocast)
        keys = [k for k in stats if k != "grad_norm"]  # every rank's mean over its rows: mean over ranks
        means = all_reduce_sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=info.device))
        rec = {"step": step, **{k: float(v) / info.world for k, v in zip(keys, means)}, "lr": cur,
               "grad_norm": stats["grad_norm"]}
        stop_if_not_finite({"loss": rec["loss"], "grad_norm": rec["grad_norm"]}, f"step {step}", ckpt_root,
                           f"lower optim.lr ({lr}) or beta ({cfg.beta})")
        rec["elapsed_s"] = elapsed = elapsed_before + time.perf_counter() - t0
        if val and (every(t.eval_every, step) or step == t.steps):
            last_val = validation()
            rec.update(last_val)
        if every(t.log_every, step) or step == t.steps or "val_loss" in rec:
            logger.log(rec)
        if every(t.ckpt_every, step) and step < t.steps:
            ckpt.save_train_state(ckpt_root, step, model, optimizer,
                                  {**batches.state_dict(), "val_before": val_before, "last_val": last_val,
                                   "elapsed_s": elapsed},
                                  dataclasses.asdict(cfg), {"loss": rec["loss"]}, keep=t.keep_last,
                                  is_main=info.is_main, trainable_only=True)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['reward_accuracy']:.2f}",
                        margin=f"{rec['reward_margin']:.3f}")
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    model = unwrap(model)
    if not info.is_main:
        return {}
    model.eval()

    resolved = dataclasses.asdict(cfg)
    summary = {
        "loss_type": cfg.loss_type, "peft": cfg.peft, "reference": reference, "model": cfg.model,
        "data": data.files, "steps": t.steps, "train_pairs": len(data.train), "val_pairs": len(val),
        "dropped_pairs": data.dropped, "trainable_params": params["trainable"], "total_params": params["total"],
        "val_before": val_before, "val_after": last_val, "train_seconds": elapsed, "world": info.world,
    }
    write_model(model, out, cfg.peft, cfg.model, tokenizer, {"dpo": resolved})

    def plots(records: list[dict]) -> None:
        plot_metrics(records, out / "loss.png", title=f"{cfg.loss_type} ({cfg.peft})")
        plot_rewards(records, out / "rewards.png", title=f"{cfg.loss_type} ({cfg.peft}): implicit rewards")

    finish_run(out, partial, "dpo", resolved, summary, plots)
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"{s['loss_type']} with {s['peft']} (reference: {s['reference']}): {s['trainable_params']:,} trainable "
             f"of {s['total_params']:,} parameters; {s['train_pairs']} training pairs",
             f"{s['steps']} steps in {s['train_seconds']:.1f}s"]
    b, a = s["val_before"], s["val_after"]
    if b:
        lines.append(f"held-out ({s['val_pairs']} pairs): loss {b['val_loss']:.4f} -> {a['val_loss']:.4f}, "
                     f"reward accuracy {b['val_reward_accuracy']:.3f} -> {a['val_reward_accuracy']:.3f}, "
                     f"margin {b['val_reward_margin']:.4f} -> {a['val_reward_margin']:.4f}")
    return lines
