"""Supervised fine-tuning recipe: one explicit loop for every method (full, selective, LoRA, QLoRA,
bottleneck adapters, prompt tuning, LLaMA-Adapter). The method only decides which module swaps are
applied and which parameters train; the loop (optimiser groups, LR schedule, accumulation, clipping,
autocast, metrics, plots, progress, resumable step checkpoints, DDP/FSDP) is the shared one from
`llmkit.train`, and the loss is `sft_loss`, given to `train_step` as its loss_fn.

    cfg = load_config(FinetuneConfig, "ft.yaml", ["method=lora", "lora.r=16", "train.steps=200"])
    finetune(cfg)

The config nests the shared sections of `recipes/config.py` (data, optim, train) like pretraining does,
plus the methods' own sections (lora:, qlora:, ...). Runs alone or under `torchrun --nproc_per_node=K`
(train.strategy = ddp | fsdp): every rank draws the same global batch of train.batch_size examples
(or packed rows) and takes its own rows, so the losses equal one process's with that batch.

Output directory OUT: the adapter (adapter_config.json + adapter_model.safetensors, loadable with
`--adapter DIR` or by HF peft) or, for full/selective, an llmkit checkpoint; plus metrics.jsonl,
loss.png and finetune.json (the resolved config and the summary). While the run lasts, OUT.partial/
holds metrics.jsonl and the step checkpoints (trainable weights, optimiser, RNG, data position) that
`--resume` continues from exactly; it is removed once OUT is written.

`task=classify` fine-tunes a BERT encoder with a sequence-classification head instead (JSONL
{"text"[, "text_pair"], "label"}; method=full): recipes/classify.py, on the same sections and loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from ..finetune.data import document_mask, example_stream, load_sft_data, packed_batch, pad_batch
from ..io import locks_run_dir
from ..losses import cross_entropy, linear_cross_entropy
from ..peft import apply_method as apply_peft_method
from ..peft import METHODS  # noqa: F401  (the CLI's choices)
from ..peft import PeftSections, get_method, memory_report, trainable_summary
from ..quant.qat import convert_qat, prepare_qat
from ..train import checkpoint as ckpt
from ..train.dist import DistInfo, all_reduce_sum, init_distributed, unwrap, wrap_model
from ..train.loop import MetricsLogger, autocast_context, plot_metrics, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .config import DataSection, OptimSection, TrainSection, check_inputs, check_sections, every
from .common import finish_run, load_base, restore, seed_torch, start_point, write_model


@dataclass
class SFTDataSection(DataSection):
    files: list[str] = field(default_factory=list)  # FILE or FILE:WEIGHT (--data FILE[,FILE...])
    packing: bool = False  # whole examples packed into seq_len rows, attention kept within each
    val_fraction: float = 0.05
    max_val_examples: int = 200
    max_records: int | None = None  # per file, for quick runs
    system: str | None = None  # system prompt added to records that have none


@dataclass
class FinetuneConfig(PeftSections):
    model: str = ""  # --model
    base_adapter: str | None = None  # a LoRA adapter merged into the model before fine-tuning (--adapter)
    method: str = "lora"
    task: str = "sft"  # sft: a decoder on chat/completion data | classify: a BERT encoder + classifier head
    # quantization-aware training: fake-quantize the linears with this llmkit.quant method (e.g. int4-sym-b32)
    # during training, write the real quantized checkpoint at the end (method full or selective)
    qat: str = ""
    data: SFTDataSection = field(default_factory=lambda: SFTDataSection(seq_len=512))
    # optim.lr None: the method's default (its PEFT record's default_lr)
    optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=10, weight_decay=0.0))
    # train.batch_size examples (or packed rows) per optimiser step; micro_batch_size < batch_size accumulates
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=100, batch_size=4, seed=0, eval_every=50, ckpt_every=100, keep_last=2))
    # + the sections of every PEFT method (lora:, qlora:, adapter:, ...), from llmkit.peft.PeftSections

    def validate(self, world: int = 1) -> tuple[int, int]:
        """Check the config; returns (micro batch per rank, accumulation steps)."""
        method = get_method(self.method)  # an unknown name raises, naming the close spelling
        check_inputs(self)
        micro, accum = check_sections(self.data, self.optim, self.train, world)
        if method.validate is not None:
            method.validate(self)
        if self.qat:
            from ..quant import get_method as get_quant_method

            get_quant_method(self.qat)  # an unknown or unsupported spelling fails now, naming the value
            if method.saves_adapter:
                raise LLMKitError(f"qat={self.qat} needs method=full or selective (it writes a quantized "
                                  f"checkpoint), not {self.method}")
        if self.data.packing and not method.supports_packing:
            raise LLMKitError(f"method {self.method} cannot train on packed rows: use data.packing=false")
        return micro, accum


# ------------------------------------------------------------------ methods
def apply_method(model: nn.Module, cfg: FinetuneConfig, tokenizer=None) -> nn.Module:
    """Apply the module swaps / freezing of cfg.method to `model` (in place), reading its sections of cfg."""
    return apply_peft_method(model, cfg.method, cfg, tokenizer)


# ------------------------------------------------------------------ loss
def sft_logits(model: nn.Module, batch: dict, return_hidden: bool = False) -> torch.Tensor:
    """Logits (B, T, V) for a batch: with document masking and per-document positions (packed rows),
    or plainly. A soft prompt (prompt tuning) is the model's own prefix, put in front by its forward.
    return_hidden: the final hidden states (B, T, C) instead, for a loss fused with the output projection."""
    kw = {"return_hidden": True} if return_hidden else {}
    if "doc" in batch:
        return model(batch["idx"], input_pos=batch["input_pos"], attn_mask=document_mask(batch["doc"]), **kw)
    return model(batch["idx"], **kw)


def sft_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The loss_fn of fine-tuning: cross-entropy over completion tokens (targets -100 elsewhere).

    Summed, then divided by batch["loss_tokens"]: the global batch's completion tokens per micro-batch
    (N / (M x world)), so that train_step's 1/M and DDP's mean over ranks make the gradient that of
    the token-weighted mean over the whole global batch, however it is split (the gradient-accumulation
    normalisation of HF transformers 4.46 / torchtune). Without it: the micro-batch's own mean."""
    targets = batch["targets"]  # (B, T)
    head = unwrap(model).lm_head
    if type(head) is nn.Linear:  # a plain output projection: fused with the loss, logits never materialised
        hidden = sft_logits(model, batch, return_hidden=True)  # (B, T, C)
        nll = linear_cross_entropy(hidden, head.weight, targets, head.bias, reduction="sum")
    else:  # an adapted, quantized or sharded head (LoRA on lm_head, FSDP): its own forward
        logits = sft_logits(model, batch)  # (B, T, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum")
    loss = nll / batch.get("loss_tokens", (targets != -100).sum().clamp(min=1))
    return loss, {"loss": loss}


@torch.no_grad()
def val_loss(model: nn.Module, examples, batch_size: int, pad_id: int, device=None, autocast=None) -> float:
    """Token-weighted mean completion loss over the validation examples (one example per row)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) if device is not None else v for k, v in pad_batch(examples[i:i + batch_size],
                                                                                 pad_id).items()}
        with autocast or contextlib.nullcontext():
            logits = sft_logits(model, b)
        n = int((b["targets"] != -100).sum())
        total += float(cross_entropy(logits, b["targets"])) * n
        count += n
    model.train(was)
    return total / max(count, 1)


class SFTBatches:
    """The global batch of each step, drawn from the endless weighted example stream: B examples (one
    per row, padded per micro-batch) or B packed rows. Every rank draws the same global batch and keeps
    its own rows. Resumable: the state is the number of batches drawn, and `load_state_dict` replays
    them (the stream and the packing carry-over are deterministic; replaying costs no forward)."""

    def __init__(self, data, batch_size: int, seq_len: int, pad_id: int, packing: bool, seed: int,
                 rank: int = 0, world: int = 1):
        self.stream = example_stream(data.train, data.weights, seed)
        self.carry: list = []
        self.drawn = 0
        self.B, self.T, self.pad_id, self.packing = batch_size, seq_len, pad_id, packing
        self.rank, self.world = rank, world

    def _draw(self):
        self.drawn += 1
        if self.packing:
            return packed_batch(self.stream, self.B, self.T, self.pad_id, self.carry)  # dict of (B, T)
        return [next(self.stream) for _ in range(self.B)]

    def next_micro_batches(self, micro: int) -> tuple[list[dict], int]:
        """This rank's rows of the next global batch, as micro-batches of `micro` rows, each carrying
        loss_tokens (see sft_loss); and the global batch's completion-token count."""
        g = self._draw()
        lo, hi = self.rank * self.B // self.world, (self.rank + 1) * self.B // self.world
        if self.packing:
            n_tokens = int((g["targets"] != -100).sum())
            mine = {k: v[lo:hi] for k, v in g.items()}
            batches = [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, hi - lo, micro)]
        else:
            n_tokens = sum(sum(lab != -100 for lab in e.labels[1:]) for e in g)
            batches = [pad_batch(g[i:i + micro], self.pad_id) for i in range(lo, hi, micro)]
        share = n_tokens / (len(batches) * self.world)
        return [{**b, "loss_tokens": share} for b in batches], n_tokens

    def state_dict(self) -> dict:
        return {"batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        while self.drawn < state["batches"]:
            self._draw()


# ------------------------------------------------------------------ the run
@locks_run_dir  # one writer per train.out_dir (and its .partial)
def finetune(cfg: FinetuneConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False,
             resume: bool | str = False, force: bool = False) -> dict:
    """Fine-tune and write the result to cfg.train.out_dir. `model`/`tokenizer` may be given directly
    (tests); otherwise cfg.model is loaded. `resume`: True for the latest step checkpoint of the
    interrupted run in OUT.partial, or a checkpoint directory. Returns the summary dict (also written
    to finetune.json; empty on ranks other than 0)."""
    if cfg.task not in ("sft", "classify"):
        raise LLMKitError(f"task {cfg.task!r} is not one of sft, classify")
    if cfg.task == "classify":
        from .classify import finetune_classifier

        return finetune_classifier(cfg, model, tokenizer, quiet, resume, force)
    t = cfg.train
    info: DistInfo = init_distributed(t.device)
    micro, accum = cfg.validate(info.world)
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, info)

    seed_torch(t)
    if model is None:
        model, tokenizer = load_base(cfg.model, cfg.base_adapter)
    if tokenizer is None:
        raise LLMKitError(f"model {cfg.model!r} comes without a tokenizer; fine-tuning needs one for the chat template")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    d = cfg.data
    data = load_sft_data(d.files, tokenizer, d.seq_len, d.val_fraction, t.seed, d.system, d.max_records)
    val = data.val[: d.max_val_examples]

    # ---- model and optimiser (same seed on every rank: identical adapters)
    mem_before = memory_report(model)
    apply_method(model, cfg, tokenizer)
    prepare_qat(model, cfg.qat)  # fake-quantized linears sharing the trained parameters (none without qat)
    if d.seq_len > model.max_tokens:  # e.g. prompt tuning's virtual tokens take positions of the window
        raise LLMKitError(f"data.seq_len {d.seq_len} does not fit the {model.max_tokens} tokens the model takes "
                          f"(context window {model.cfg.max_seq_len}, less {model.n_prefix} for its prefix): "
                          f"set data.seq_len <= {model.max_tokens}")
    model.train()
    params = trainable_summary(model)
    mem_after = memory_report(model)
    model.to(info.device)
    fsdp = info.enabled and t.strategy == "fsdp"
    # FSDP shards the weights in place: rank 0 keeps a plain copy to load the final full weights into
    template = copy.deepcopy(model) if fsdp and info.is_main else None
    model = wrap_model(model, t.strategy, info)
    lr, min_lr = cfg.optim.peak(get_method(cfg.method).default_lr)
    o = cfg.optim
    optimizer = OPTIMIZERS[o.name](model, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(info.device, t.dtype)
    batches = SFTBatches(data, t.batch_size, d.seq_len, pad_id, d.packing, t.seed, info.rank, info.world)

    start_step, state = restore(start_ckpt, model, optimizer, batches)
    run_config = dataclasses.asdict(cfg)
    logger = MetricsLogger(partial / "metrics.jsonl", enabled=info.is_main, tensorboard=False,
                           resume_step=start_step if start_ckpt else None)

    def validation() -> float | None:
        return val_loss(model, val, micro, pad_id, info.device, autocast) if val else None

    run = state.get("loader", {})
    val_before = run["val_before"] if start_ckpt else validation()
    if val_before is not None and not start_ckpt:
        logger.log({"step": 0, "val_loss": val_before})
    tokens, elapsed_before = run.get("tokens", 0), run.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start_step, enabled=not quiet and t.progress and info.is_main,
                       desc=f"finetune[{cfg.method}]")
    t0, last_val = time.perf_counter(), run.get("last_val", val_before)
    for step in range(start_step + 1, t.steps + 1):
        cur = lr_at(step - 1, max_lr=lr, total_steps=t.steps, warmup_steps=min(o.warmup_steps, t.steps),
                    min_lr=min_lr, kind=o.schedule)
        set_lr(optimizer, cur)
        mine, n_tokens = batches.next_micro_batches(micro)
        micro_batches = [{k: v.to(info.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in mine]
        tokens += n_tokens
        stats = train_step(model, optimizer, micro_batches, loss_fn=sft_loss, grad_clip=o.grad_clip,
                           autocast=autocast)
        # each rank's loss is its share of the global token-weighted mean: their mean over ranks is it
        loss = float(all_reduce_sum(torch.tensor([stats["loss"]], dtype=torch.float64, device=info.device))[0])
        loss /= info.world
        if not math.isfinite(loss):
            raise LLMKitError(f"loss became {loss} at step {step}; lower the learning rate (optim.lr={lr})")
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"step": step, "loss": loss, "lr": cur, "grad_norm": stats["grad_norm"],
               "completion_tokens": tokens, "elapsed_s": elapsed}
        if val and (every(t.eval_every, step) or step == t.steps):
            rec["val_loss"] = last_val = validation()
        if every(t.log_every, step) or "val_loss" in rec or step == t.steps:
            logger.log(rec)
        if every(t.ckpt_every, step) and step < t.steps:
            ckpt.save_train_state(ckpt_root, step, model, optimizer,
                                  {**batches.state_dict(), "val_before": val_before, "last_val": last_val,
                                   "tokens": tokens, "elapsed_s": elapsed},
                                  run_config, {"loss": loss}, keep=t.keep_last, is_main=info.is_main,
                                  trainable_only=True)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = elapsed_before + time.perf_counter() - t0

    # ---- the output: rank 0 writes it from a plain model (FSDP: the gathered full weights)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=ckpt._options())  # a collective: every rank
        if template is not None:
            template.load_state_dict(full, strict=False)  # tied weights appear once in `full`
        model = template
    else:
        model = unwrap(model)
    if not info.is_main:
        return {}
    model.eval()

    summary = {
        "method": cfg.method, "model": cfg.model, "data": data.files, "steps": t.steps,
        "train_examples": sum(len(x) for x in data.train), "val_examples": len(val), "dropped_examples": data.dropped,
        "trainable_params": params["trainable"], "total_params": params["total"], "trainable_share": params["share"],
        "weights_bytes_before": mem_before["stored_bytes"], "weights_bytes_after": mem_after["stored_bytes"],
        "val_loss_before": val_before, "val_loss_after": last_val,
        "train_seconds": elapsed, "completion_tokens": tokens, "world": info.world,
    }
    method = get_method(cfg.method)
    if method.summary is not None:
        summary.update(method.summary(model, tokenizer))
    resolved = dataclasses.asdict(cfg)
    convert_qat(model)  # qat: the real quantized layers, computing what training computed
    write_model(model, out, cfg.method, cfg.model, tokenizer, {"finetune": resolved})
    finish_run(out, partial, "finetune", resolved, summary,
               lambda records: plot_metrics(records, out / "loss.png", title=f"fine-tuning ({cfg.method})"))
    return summary


def summary_lines(s: dict) -> list[str]:
    if s.get("task") == "classify":
        from .classify import summary_lines as classify_lines

        return classify_lines(s)
    lines = [f"method {s['method']}: {s['trainable_params']:,} trainable of {s['total_params']:,} parameters "
             f"({100 * s['trainable_share']:.3f}%)",
             f"{s['steps']} steps in {s['train_seconds']:.1f}s, {s['completion_tokens']:,} completion tokens"]
    if s["val_loss_before"] is not None:
        lines.append(f"val loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}")
    if s["weights_bytes_after"] != s["weights_bytes_before"]:
        lines.append(f"weights in memory {s['weights_bytes_before'] / 2**20:.1f} MiB -> "
                     f"{s['weights_bytes_after'] / 2**20:.1f} MiB")
    if "prompt_nearest_tokens" in s:
        lines.append("soft prompt nearest tokens: " + " ".join(repr(t) for t in s["prompt_nearest_tokens"]))
    return lines
