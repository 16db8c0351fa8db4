"""Knowledge distillation recipe (Hinton, Vinyals & Dean 2015): a student learns the teacher's softened
next-token distributions (plus the data's hard labels) with `distill_loss`, in one explicit loop.

    cfg = load_config(DistillConfig, None, ["teacher=smollm2-135m-instruct", "student.layers=6",
                                            "data.files=chat.jsonl", "train.out_dir=draft"])
    distill(cfg)

The student is one of
  - a depth-pruned copy of the teacher (`student.layers=N`): N of its blocks (spread evenly, or the first
    N), its embeddings, final norm and head copied. It starts close to the teacher, so it learns fast;
    the natural speculative-decoding draft (same vocabulary by construction);
  - a preset (`student.model=tiny-llama`): a fresh random model of that shape with the teacher's vocabulary;
  - a checkpoint / registry name (`student.model=DIR`): it must have the teacher's vocabulary (a one-line
    error naming both sizes otherwise).

Teacher logits are computed on the fly under no_grad. With `distill.topk_cache=DIR` the teacher's top-k
logits and their ids (distill.topk) of every step's batch are written there as safetensors shards on the
first run and read back by later runs over the same data (another student, temperature or alpha): the
teacher forward is then skipped, and the soft term uses the teacher's distribution renormalised over its
top k (a large vocabulary's full logits would be B·T·V floats a step).

The data, optimiser, schedule, step checkpoints (--resume), metrics JSONL + PNG and progress bar are the
fine-tuning recipe's (SFTBatches, train_step, MetricsLogger, recipes/common.py); one process only.
Output OUT: an llmkit checkpoint of the student (with the teacher's tokenizer), metrics.jsonl, loss.png
and distill.json (the resolved config and the summary, with the validation top-1 agreement: the share
of positions where the student's argmax is the teacher's, what a greedy draft's acceptance rate follows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..finetune.data import load_sft_data, pad_batch
from ..io import atomic_path, locks_run_dir
from ..losses import distill_loss
from ..models import ModelConfig, Transformer
from ..models.config import PRESETS
from ..train import checkpoint as ckpt
from ..train.dist import init_distributed
from ..train.loop import MetricsLogger, autocast_context, plot_metrics, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .common import finish_run, load_base, restore, seed_torch, start_point, stop_if_not_finite, write_model
from .config import OptimSection, TrainSection, check_sections, every
from .finetune import SFTBatches, SFTDataSection

KEEP = ("spread", "first")


@dataclass
class StudentSection:
    model: str = ""  # a preset (fresh weights, the teacher's vocabulary) or a checkpoint / registry name (--student)
    layers: int | None = None  # or: a depth-pruned copy of the teacher with this many blocks (--student-layers)
    keep: str = "spread"  # which blocks a pruned copy keeps: spread (every k-th, first and last kept) | first
    freeze_embeddings: bool = True  # a pruned copy keeps the teacher's embeddings and (tied) head as they are


@dataclass
class DistillSection:
    temperature: float = 2.0  # τ of the soft targets
    alpha: float = 0.5  # weight of the soft term (1 − alpha: the hard-label cross-entropy)
    topk: int = 64  # logits kept per position in the top-k cache
    topk_cache: str | None = None  # DIR: cache the teacher's top-k logits there (--topk-cache)


@dataclass
class DistillConfig:
    teacher: str = ""  # --teacher
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    data: SFTDataSection = field(default_factory=lambda: SFTDataSection(seq_len=256))
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4, warmup_steps=10, weight_decay=0.0))
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=200, batch_size=4, seed=0, eval_every=50, ckpt_every=100, keep_last=2))

    def validate(self) -> tuple[int, int]:
        """Check the config; returns (micro batch, accumulation steps)."""
        s, d = self.student, self.distill
        if not self.teacher:
            raise LLMKitError("no teacher given (--teacher)")
        if bool(s.model) == (s.layers is not None):
            raise LLMKitError("give the student as one of --student PRESET_OR_CKPT or --student-layers N")
        if s.keep not in KEEP:
            raise LLMKitError(f"student.keep {s.keep!r} is not one of {', '.join(KEEP)}")
        if isinstance(self.data.files, str):
            self.data.files = [self.data.files]
        if not self.data.files:
            raise LLMKitError("no data given (--data FILE[,FILE...])")
        if not self.train.out_dir:
            raise LLMKitError("no output directory given (--out)")
        if d.temperature <= 0 or not 0 <= d.alpha <= 1 or d.topk < 1:
            raise LLMKitError(f"need distill.temperature > 0, 0 <= distill.alpha <= 1 and distill.topk >= 1 "
                              f"(got {d.temperature}, {d.alpha}, {d.topk})")
        return check_sections(self.data, self.optim, self.train, 1)


# ------------------------------------------------------------------ the student
def depth_pruned(teacher: Transformer, n_layer: int, keep: str = "spread") -> Transformer:
    """A copy of `teacher` with n_layer of its blocks: spread = evenly spaced (round(i·(L−1)/(n−1)), the
    first and last kept), first = the first n (what `truncated_draft` shares, here copied to train).
    Embeddings, final norm and head are copied; blocks are renumbered 0..n−1 (their cache slots)."""
    L = teacher.cfg.n_layer
    if not 1 <= n_layer <= L:
        raise LLMKitError(f"student.layers must be in 1..{L} (the teacher's depth), got {n_layer}")
    ids = (list(range(n_layer)) if keep == "first" or n_layer == 1
           else [round(i * (L - 1) / (n_layer - 1)) for i in range(n_layer)])
    student = Transformer(ModelConfig.from_dict({**teacher.cfg.to_dict(), "n_layer": n_layer}))
    own = {k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.")}
    for j, i in enumerate(ids):
        own.update({f"layers.{j}.{k}": v for k, v in teacher.layers[i].state_dict().items()})
    student.load_state_dict(own)  # copies: the teacher's tensors are not shared
    return student


def build_student(cfg: DistillConfig, teacher: Transformer) -> Transformer:
    s = cfg.student
    if s.layers is not None:
        student = depth_pruned(teacher, s.layers, s.keep)
        if s.freeze_embeddings:
            for p in (student.embed_tokens.weight, student.lm_head.weight):
                p.requires_grad_(False)
        return student
    if s.model in PRESETS:  # the shape of the preset, the teacher's vocabulary
        return Transformer(ModelConfig.from_preset(s.model, vocab_size=teacher.cfg.vocab_size))
    student, _ = load_base(s.model)
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise LLMKitError(f"the student's vocabulary ({student.cfg.vocab_size} tokens, {s.model}) differs from the "
                          f"teacher's ({teacher.cfg.vocab_size} tokens, {cfg.teacher}): distillation needs one tokenizer")
    return student


# ------------------------------------------------------------------ teacher logits and the top-k cache
class TopkCache:
    """The teacher's top-k logits (fp16) and ids (int32) of each micro-batch in DIR/step_{n}_{i}.safetensors,
    with a hash of the batch's token ids so a shard is never used for other data; DIR/cache.json names
    the teacher and k, and a cache for another teacher or k is refused."""

    def __init__(self, root: str, teacher: str, k: int):
        self.root, self.k = Path(root), k
        self.root.mkdir(parents=True, exist_ok=True)
        meta, path = {"teacher": teacher, "topk": k}, self.root / "cache.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != meta:
                raise LLMKitError(f"{self.root} caches {old}, not {meta}: give another --topk-cache directory")
        else:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(meta))
        self.hits = self.misses = 0

    @staticmethod
    def _key(idx: torch.Tensor) -> str:
        return hashlib.sha256(idx.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]

    def get(self, name: str, idx: torch.Tensor, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B, T, k), ids (B, T, k)) of the batch `idx` (shard `name`), read or computed
        (`compute()` -> the teacher's logits (B, T, V))."""
        from safetensors.torch import load_file, save_file

        path, key = self.root / f"{name}.safetensors", self._key(idx)
        if path.exists():
            t = load_file(path)
            if bytes(t["key"].tolist()).decode() == key:
                self.hits += 1
                return t["values"].float(), t["indices"].long()
        self.misses += 1
        values, indices = compute().float().topk(self.k, dim=-1)
        with atomic_path(path) as tmp:
            save_file({"values": values.half().contiguous(), "indices": indices.int().contiguous(),
                       "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(tmp))
        return values.half().float(), indices


def _device_batch(b: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def student_loss(d: DistillSection):
    """train_step's loss_fn: the student's logits against the batch's teacher logits (full or top-k)."""
    def loss_fn(model: nn.Module, batch: dict):
        logits = model(batch["idx"])  # (B, T, V)
        return distill_loss(logits, batch["teacher"], batch["targets"], d.temperature, d.alpha,
                            teacher_indices=batch.get("teacher_ids"), n_tokens=batch.get("loss_tokens"))
    return loss_fn


@torch.no_grad()
def validation(student, teacher, examples, batch_size: int, pad_id: int, d: DistillSection, device, autocast) -> dict:
    """Token-weighted means over the validation examples: the distillation loss, KL(teacher ‖ student) at τ,
    the hard-label CE, and top-1 agreement (student argmax == teacher argmax on scored positions)."""
    was = student.training
    student.eval()
    sums, count = {"val_loss": 0.0, "val_kl": 0.0, "val_ce": 0.0, "val_agree": 0.0}, 0
    for i in range(0, len(examples), batch_size):
        b = _device_batch(pad_batch(examples[i:i + batch_size], pad_id), device)
        with autocast or contextlib.nullcontext():
            s_logits, t_logits = student(b["idx"]), teacher(b["idx"])
        loss, m = distill_loss(s_logits, t_logits, b["targets"], d.temperature, d.alpha)
        keep = b["targets"] != -100
        n = int(keep.sum())
        agree = float(((s_logits.argmax(-1) == t_logits.argmax(-1)) & keep).sum())
        for k, v in (("val_loss", loss), ("val_kl", m["kl"]), ("val_ce", m["ce"])):
            sums[k] += float(v) * n
        sums["val_agree"] += agree
        count += n
    student.train(was)
    return {k: v / max(count, 1) for k, v in sums.items()}


# ------------------------------------------------------------------ the run
@locks_run_dir  # one writer per train.out_dir (and its .partial)
def distill(cfg: DistillConfig, teacher: nn.Module | None = None, tokenizer=None, student: nn.Module | None = None,
            quiet: bool = False, resume: bool | str = False, force: bool = False) -> dict:
    """Distil cfg.teacher into the student and write it to cfg.train.out_dir. `teacher`/`tokenizer`/
    `student` may be given directly (tests). Returns the summary (also in distill.json)."""
    t, d, o = cfg.train, cfg.distill, cfg.optim
    micro, _ = cfg.validate()
    info = init_distributed(t.device)
    if info.world > 1:
        raise LLMKitError("distill runs in one process (not under torchrun)")
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, info)

    seed_torch(t)
    if teacher is None:
        teacher, tokenizer = load_base(cfg.teacher)
    if tokenizer is None:
        raise LLMKitError(f"teacher {cfg.teacher!r} comes without a tokenizer; distillation needs one for the data")
    if student is None:
        student = build_student(cfg, teacher)
    elif student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise LLMKitError(f"the student's vocabulary ({student.cfg.vocab_size} tokens) differs from the teacher's "
                          f"({teacher.cfg.vocab_size} tokens): distillation needs one tokenizer")
    if cfg.data.seq_len > min(student.max_tokens, teacher.max_tokens):
        raise LLMKitError(f"data.seq_len {cfg.data.seq_len} exceeds the context window "
                          f"({min(student.max_tokens, teacher.max_tokens)} tokens)")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    dd = cfg.data
    data = load_sft_data(dd.files, tokenizer, dd.seq_len, dd.val_fraction, t.seed, dd.system, dd.max_records)
    val = data.val[: dd.max_val_examples]

    teacher.to(info.device).eval().requires_grad_(False)
    student.to(info.device).train()
    n_params = sum(p.numel() for p in student.parameters())
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    lr, min_lr = o.peak(3e-4)
    optimizer = OPTIMIZERS[o.name](student, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(info.device, t.dtype)
    batches = SFTBatches(data, t.batch_size, dd.seq_len, pad_id, dd.packing, t.seed)
    cache = TopkCache(d.topk_cache, cfg.teacher, d.topk) if d.topk_cache else None
    loss_fn = student_loss(d)

    start_step, state = restore(start_ckpt, student, optimizer, batches)
    run_config = dataclasses.asdict(cfg)
    logger = MetricsLogger(partial / "metrics.jsonl", tensorboard=False, resume_step=start_step if start_ckpt else None)

    def evaluate() -> dict:
        return validation(student, teacher, val, micro, pad_id, d, info.device, autocast) if val else {}

    def teacher_logits(name: str, b: dict) -> dict:
        def compute():
            with torch.no_grad(), autocast or contextlib.nullcontext():
                return teacher(b["idx"])  # (B, T, V)
        if cache is None:
            return {**b, "teacher": compute()}
        values, ids = cache.get(name, b["idx"], compute)
        return {**b, "teacher": values.to(info.device), "teacher_ids": ids.to(info.device)}

    run = state.get("loader", {})
    before = run["val_before"] if start_ckpt else evaluate()
    if before and not start_ckpt:
        logger.log({"step": 0, **before})
    tokens, elapsed_before = run.get("tokens", 0), run.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start_step, enabled=not quiet and t.progress, desc="distill")
    t0, last = time.perf_counter(), run.get("last_val", before)
    for step in range(start_step + 1, t.steps + 1):
        cur = lr_at(step - 1, max_lr=lr, total_steps=t.steps, warmup_steps=min(o.warmup_steps, t.steps),
                    min_lr=min_lr, kind=o.schedule)
        set_lr(optimizer, cur)
        mine, n_tokens = batches.next_micro_batches(micro)
        micro_batches = [teacher_logits(f"step_{step:06d}_{i}", _device_batch(b, info.device))
                         for i, b in enumerate(mine)]
        tokens += n_tokens
        stats = train_step(student, optimizer, micro_batches, loss_fn=loss_fn, grad_clip=o.grad_clip, autocast=autocast)
        # train_step's mean over micro-batches of loss_tokens-normalised losses: the step's token mean
        loss, kl, ce = stats["loss"], stats["kl"], stats["ce"]
        stop_if_not_finite({"loss": loss, "grad_norm": stats["grad_norm"]}, f"step {step}", ckpt_root,
                           hint=f"lower the learning rate (optim.lr={lr})")
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"step": step, "loss": loss, "kl": kl, "ce": ce, "lr": cur, "grad_norm": stats["grad_norm"],
               "tokens": tokens, "elapsed_s": elapsed}
        if val and (every(t.eval_every, step) or step == t.steps):
            last = evaluate()
            rec.update(last)
        if every(t.log_every, step) or "val_loss" in rec or step == t.steps:
            logger.log(rec)
        if every(t.ckpt_every, step) and step < t.steps:
            ckpt.save_train_state(ckpt_root, step, student, optimizer,
                                  {**batches.state_dict(), "val_before": before, "last_val": last,
                                   "tokens": tokens, "elapsed_s": elapsed},
                                  run_config, {"loss": loss}, keep=t.keep_last, trainable_only=True)
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}",
                        **({"agree": f"{rec['val_agree']:.3f}"} if "val_agree" in rec else {}))
        bar.update(1)
    bar.close()
    logger.close()
    student.eval()
    summary = {"teacher": cfg.teacher, "student": cfg.student.model or f"{cfg.student.layers} layers of the teacher "
               f"({cfg.student.keep})", "student_layers": student.cfg.n_layer, "student_params": n_params,
               "trainable_params": n_train, "data": data.files, "steps": t.steps, "tokens": tokens,
               "train_seconds": elapsed_before + time.perf_counter() - t0,
               "val_before": before, "val_after": last,
               **({"topk_cache_hits": cache.hits, "topk_cache_misses": cache.misses} if cache else {})}
    resolved = dataclasses.asdict(cfg)
    write_model(student, out, "full", cfg.teacher, tokenizer, {"distill": resolved})
    finish_run(out, partial, "distill", resolved, summary,
               lambda records: plot_metrics(records, out / "loss.png", title="distillation"))
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"student: {s['student']}, {s['student_params']:,} parameters ({s['trainable_params']:,} trained)",
             f"{s['steps']} steps in {s['train_seconds']:.1f}s, {s['tokens']:,} target tokens"]
    b, a = s["val_before"], s["val_after"]
    if b:
        lines.append(f"val KL(teacher||student) {b['val_kl']:.4f} -> {a['val_kl']:.4f}, CE {b['val_ce']:.4f} -> "
                     f"{a['val_ce']:.4f}, top-1 agreement {b['val_agree']:.3f} -> {a['val_agree']:.3f}")
    return lines
