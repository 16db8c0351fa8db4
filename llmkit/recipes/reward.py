"""Reward-model recipe (InstructGPT, Ouyang et al. 2022, sec. 3.5): a policy or base model gets a scalar head
on its last non-pad token and learns, from preference pairs, r(prompt, chosen) > r(prompt, rejected) with the
Bradley-Terry loss. LoRA on the backbone by default (the head always trains), full weights with method=full.

    cfg = load_config(RewardConfig, None, ["model=smollm2-135m-instruct", "data.files=[hh.jsonl.gz]",
                                           "train.steps=200", "out_dir=..."])
    train_reward(cfg)

The loop is the shared one: `train_step` with `reward_loss` as its loss_fn, the LR schedule, metrics JSONL,
a PNG, a progress bar, step checkpoints of the trainable tensors (head + adapter) in OUT.partial that
`--resume` continues from exactly (the pair stream is replayed to its position). Held-out accuracy (share
of pairs with r_chosen > r_rejected) is measured before training (the fresh head) and after.

Output directory OUT: the RM as a Hugging Face sequence-classification checkpoint (LoRA merged in; see
llmkit.align.reward), loadable by `AutoModelForSequenceClassification`, `load_reward_model` and
`llmkit reward --model OUT`; plus metrics.jsonl, loss.png and reward.json (config and summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..align.data import load_preference_data, preference_batch
from ..align.reward import RewardModel, apply_method, is_reward_model, load_reward_model, reward_model_from
from ..align.reward import save_reward_model
from ..errors import LLMKitError
from ..finetune.data import example_stream
from ..io import locks_run_dir
from ..losses import bradley_terry_loss
from ..peft import SelectiveSection, get_method, trainable_summary, unload
from ..peft.lora import LoRAConfig
from ..train import checkpoint as ckpt
from ..train.dist import DistInfo, pick_device
from ..train.loop import MetricsLogger, autocast_context, plot_metrics, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .config import DataSection, OptimSection, TrainSection, check_inputs, check_sections, every
from .common import finish_run, restore, seed_torch, start_point, stop_if_not_finite


@dataclass
class PreferenceDataSection(DataSection):
    files: list[str] = field(default_factory=list)  # --data FILE[,FILE...] (.json, .jsonl, .jsonl.gz)
    val_fraction: float = 0.05
    max_val_pairs: int = 200
    max_records: int | None = None  # per file, for quick runs
    system: str | None = None  # system prompt added to prompts that have none


@dataclass
class RewardConfig:
    model: str = ""  # --model: a policy/base LM (a fresh head is added) or a reward model to train further
    method: str = "lora"  # the PEFT method on the backbone; it must fold into the weights (lora, full, selective)
    data: PreferenceDataSection = field(default_factory=lambda: PreferenceDataSection(seq_len=512))
    # optim.lr None: the method's default learning rate
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=10, weight_decay=0.0))
    # train.batch_size preference pairs per optimiser step (2x as many sequences)
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=100, batch_size=8, seed=0, eval_every=50, ckpt_every=100, keep_last=2))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    selective: SelectiveSection = field(default_factory=SelectiveSection)

    def validate(self) -> tuple[int, int]:
        method = get_method(self.method)
        if method.saves_adapter and not method.mergeable:
            raise LLMKitError(f"method {self.method} cannot be folded into the weights, and a reward model is saved "
                              "as a full sequence-classification checkpoint: use lora, full or selective")
        missing = [s for s in method.sections if not hasattr(self, s)]
        if missing:
            raise LLMKitError(f"method {self.method} is not available for reward models (use lora, full or selective)")
        check_inputs(self)
        micro, accum = check_sections(self.data, self.optim, self.train, 1)
        if method.validate is not None:
            method.validate(self)
        return micro, accum


# ------------------------------------------------------------------ loss and evaluation
def reward_loss(model: RewardModel, batch: dict) -> tuple[torch.Tensor, dict]:
    """train_step's loss_fn: batch from preference_batch (rows [chosen; rejected]) -> Bradley-Terry."""
    r = model(batch["idx"])  # (2B,)
    B = r.size(0) // 2
    return bradley_terry_loss(r[:B], r[B:])


@torch.no_grad()
def evaluate_pairs(model: RewardModel, pairs, batch_size: int, pad_id: int, device, autocast=None) -> dict:
    """Pair-weighted mean loss, accuracy and margin over held-out pairs."""
    was = model.training
    model.eval()
    sums, n = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        with autocast or contextlib.nullcontext():
            _, m = reward_loss(model, {"idx": preference_batch(chunk, pad_id)["idx"].to(device)})
        for k in sums:
            sums[k] += float(m[k]) * len(chunk)
        n += len(chunk)
    model.train(was)
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}


class PairBatches:
    """Each step's batch: the next B pairs of an endless stream over the training pairs (reshuffled every
    pass). Resumable: the state is the number of batches drawn, replayed on load (no forward)."""

    def __init__(self, pairs, batch_size: int, seed: int):
        self.stream = example_stream([pairs], [1.0], seed)
        self.B, self.drawn = batch_size, 0

    def next(self) -> list:
        self.drawn += 1
        return [next(self.stream) for _ in range(self.B)]

    def state_dict(self) -> dict:
        return {"batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        while self.drawn < state["batches"]:
            self.next()


def build_reward_model(spec: str) -> tuple[RewardModel, object]:
    """--model: a reward model directory continues training it; any language model gets a fresh head."""
    if Path(spec).is_dir() and is_reward_model(spec):
        return load_reward_model(spec)
    from ..loading import load_model

    model, tok = load_model(spec, dtype=torch.float32)
    if tok is None:
        raise LLMKitError(f"model {spec!r} comes without a tokenizer; a reward model needs one for the chat template")
    return reward_model_from(model, tok), tok


# ------------------------------------------------------------------ the run
@locks_run_dir  # one writer per train.out_dir (and its .partial)
def train_reward(cfg: RewardConfig, model: RewardModel | None = None, tokenizer=None, quiet: bool = False,
                 resume: bool | str = False, force: bool = False) -> dict:
    """Train a reward model and write it to cfg.train.out_dir. `model` (a RewardModel) and `tokenizer` may be
    given directly (tests). `resume`: True for the latest step checkpoint in OUT.partial, or a checkpoint
    directory. Returns the summary (also in reward.json)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    micro, _ = cfg.validate()
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, DistInfo())  # one process

    seed_torch(t)
    if model is None:
        model, tokenizer = build_reward_model(cfg.model)
    if tokenizer is None:
        raise LLMKitError("a reward model needs a tokenizer for the chat template")
    pad_id = model.pad_id if model.pad_id is not None else 0
    data = load_preference_data(d.files, tokenizer, d.seq_len, d.val_fraction, t.seed, d.system, d.max_records)
    if d.seq_len > model.model.max_tokens:
        raise LLMKitError(f"data.seq_len {d.seq_len} is longer than the model's context window "
                          f"{model.model.max_tokens}: set data.seq_len <= {model.model.max_tokens}")
    val = data.val[: d.max_val_pairs]

    apply_method(model, cfg.method, cfg, tokenizer)
    params = trainable_summary(model)
    device = pick_device(t.device)
    model.to(device).train()
    lr, min_lr = o.peak(get_method(cfg.method).default_lr)
    optimizer = OPTIMIZERS[o.name](model, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(device, t.dtype)
    batches = PairBatches(data.train, t.batch_size, t.seed)

    start_step, state = restore(start_ckpt, model, optimizer, batches)
    run = state.get("loader", {})
    logger = MetricsLogger(partial / "metrics.jsonl", tensorboard=False, resume_step=start_step if start_ckpt else None)

    def validation() -> dict:
        return evaluate_pairs(model, val, micro, pad_id, device, autocast) if val else {}

    before = run["val_before"] if start_ckpt else validation()
    if before and not start_ckpt:
        logger.log({"step": 0, **before})
    last, elapsed_before = run.get("last_val", before), run.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start_step, enabled=not quiet and t.progress, desc=f"reward[{cfg.method}]")
    t0 = time.perf_counter()
    for step in range(start_step + 1, t.steps + 1):
        cur = lr_at(step - 1, max_lr=lr, total_steps=t.steps, warmup_steps=min(o.warmup_steps, t.steps),
                    min_lr=min_lr, kind=o.schedule)
        set_lr(optimizer, cur)
        pairs = batches.next()
        micro_batches = [{"idx": preference_batch(pairs[i:i + micro], pad_id)["idx"].to(device)}
                         for i in range(0, len(pairs), micro)]
        stats = train_step(model, optimizer, micro_batches, loss_fn=reward_loss, grad_clip=o.grad_clip,
                           autocast=autocast)
        stop_if_not_finite({"loss": stats["loss"], "grad_norm": stats["grad_norm"]}, f"step {step}", ckpt_root,
                           f"lower the learning rate (optim.lr={lr})")
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"step": step, "loss": stats["loss"], "accuracy": stats["accuracy"], "margin": stats["margin"],
               "lr": cur, "grad_norm": stats["grad_norm"], "elapsed_s": elapsed}
        if val and (every(t.eval_every, step) or step == t.steps):
            last = validation()
            rec.update(last)
        if every(t.log_every, step) or "val_loss" in rec or step == t.steps:
            logger.log(rec)
        if every(t.ckpt_every, step) and step < t.steps:
            ckpt.save_train_state(ckpt_root, step, model, optimizer,
                                  {**batches.state_dict(), "val_before": before, "last_val": last,
                                   "elapsed_s": elapsed},
                                  dataclasses.asdict(cfg), {"loss": stats["loss"]}, keep=t.keep_last,
                                  trainable_only=True)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}",
                        **({"val_acc": f"{rec['val_accuracy']:.3f}"} if "val_accuracy" in rec else {}))
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = elapsed_before + time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        unload(model.model, merge=True)  # the adapter folds into the backbone: a plain HF checkpoint
    model.to("cpu")
    summary = {
        "method": cfg.method, "model": cfg.model, "data": data.files, "steps": t.steps,
        "train_pairs": len(data.train), "val_pairs": len(val), "dropped_pairs": data.dropped,
        "truncated_pairs": data.truncated, "trainable_params": params["trainable"], "total_params": params["total"],
        "trainable_share": params["share"], "train_seconds": elapsed,
        "val_accuracy_before": before.get("val_accuracy"), "val_accuracy_after": last.get("val_accuracy"),
        "val_loss_before": before.get("val_loss"), "val_loss_after": last.get("val_loss"),
    }
    resolved = dataclasses.asdict(cfg)
    save_reward_model(model, out, tokenizer=tokenizer, meta={"reward": resolved, "summary": summary}, force=True)
    finish_run(out, partial, "reward", resolved, summary,
               lambda records: plot_metrics(records, out / "loss.png", title=f"reward model ({cfg.method})"))
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"reward model ({s['method']}): {s['trainable_params']:,} trainable of {s['total_params']:,} parameters "
             f"({100 * s['trainable_share']:.3f}%)",
             f"{s['steps']} steps in {s['train_seconds']:.1f}s on {s['train_pairs']} pairs "
             f"({s['dropped_pairs']} dropped, {s['truncated_pairs']} truncated)"]
    if s["val_accuracy_before"] is not None:
        lines.append(f"held-out accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy_after']:.3f} "
                     f"on {s['val_pairs']} pairs (loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f})")
    return lines
