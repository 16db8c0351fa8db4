"""Supervised fine-tuning recipe: one explicit loop for every method (full, selective, LoRA, QLoRA,
bottleneck adapters, prompt tuning, LLaMA-Adapter). The method only decides which module swaps are
applied and which parameters train; the loop (AdamW groups, LR schedule, accumulation, clipping,
metrics, plots, progress) is the shared one from `llmkit.train`.

    cfg = load_config(FinetuneConfig, "ft.yaml", ["method=lora", "lora.r=16"])
    finetune(cfg)

Output directory: the adapter (adapter_config.json + adapter_model.safetensors, loadable with
`--adapter DIR` or by HF peft) or, for full/selective, an llmkit checkpoint; plus metrics.jsonl,
loss.png and finetune.json (the resolved config and the summary).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..finetune.data import document_mask, example_stream, load_sft_data, packed_batch, pad_batch
from ..io import atomic_write_json, check_overwrite
from ..losses import cross_entropy
from ..peft import (apply_adapters, apply_llama_adapter, apply_lora, apply_prompt_tuning, memory_report,
                    nearest_tokens, quantize_model_nf4, save_adapter, select_trainable, trainable_summary)
from ..peft.lora import LoRAConfig
from ..train.loop import MetricsLogger, plot_metrics, progress_bar, read_metrics, train_step
from ..train.optim import build_adamw
from ..train.schedule import lr_at, set_lr

METHODS = ("full", "selective", "lora", "qlora", "adapter", "prompt", "llama-adapter")
DEFAULT_LR = {"full": 2e-5, "selective": 5e-5, "lora": 2e-4, "qlora": 2e-4, "adapter": 1e-3, "prompt": 3e-2,
              "llama-adapter": 1e-2}


@dataclass
class QLoRASection:
    blocksize: int = 64
    double_quant: bool = True
    quantize: str = "all-linear"  # which linears are stored in NF4 (lm_head stays: tied to the embedding)


@dataclass
class SelectiveSection:
    modules: list[str] = field(default_factory=list)
    top_n_layers: int = 0
    attention_only: bool = False


@dataclass
class AdapterSection:
    bottleneck: int = 64
    where: list[str] = field(default_factory=lambda: ["self_attn", "mlp"])


@dataclass
class PromptSection:
    n_tokens: int = 20
    init_text: str | None = None  # initialise from this text's token embeddings (else random tokens)


@dataclass
class LlamaAdapterSection:
    adapter_len: int = 10
    n_layers: int = 8


@dataclass
class FinetuneConfig:
    model: str = ""
    base_adapter: str | None = None  # a LoRA adapter merged into the model before fine-tuning (--adapter)
    data: list[str] = field(default_factory=list)  # FILE or FILE:WEIGHT
    method: str = "lora"
    out: str = ""
    force: bool = False
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    lr: float | None = None  # None: the method's default (DEFAULT_LR)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    packing: bool = False
    val_fraction: float = 0.05
    eval_every: int = 50
    max_val_examples: int = 200
    max_records: int | None = None  # per file, for quick runs
    system: str | None = None  # system prompt added to records that have none
    seed: int = 0
    threads: int = 2
    log_every: int = 1
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qlora: QLoRASection = field(default_factory=QLoRASection)
    selective: SelectiveSection = field(default_factory=SelectiveSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    llama_adapter: LlamaAdapterSection = field(default_factory=LlamaAdapterSection)

    def validate(self) -> None:
        # YAML reads "5e-5" (no dot) as a string: accept any number written as text
        for sec, name in [(self, "lr"), (self, "min_lr_ratio"), (self, "weight_decay"), (self, "grad_clip"),
                          (self, "val_fraction"), (self.lora, "alpha"), (self.lora, "dropout")]:
            v = getattr(sec, name)
            if isinstance(v, str):
                try:
                    setattr(sec, name, float(v))
                except ValueError:
                    raise LLMKitError(f"{name} must be a number, got {v!r}") from None
        if self.method not in METHODS:
            from ..errors import closest

            raise LLMKitError(f"unknown method {self.method!r}{closest(self.method, METHODS)}; "
                              f"choose one of {', '.join(METHODS)}")
        if not self.model:
            raise LLMKitError("no model given (--model)")
        if not self.data:
            raise LLMKitError("no data given (--data FILE[,FILE...])")
        if not self.out:
            raise LLMKitError("no output directory given (--out)")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) <= 0:
                raise LLMKitError(f"{name} must be positive, got {getattr(self, name)}")
        if self.method in ("lora", "qlora") and (not isinstance(self.lora.r, int) or self.lora.r <= 0):
            raise LLMKitError(f"LoRA rank r must be a positive integer, got {self.lora.r!r}")


# ------------------------------------------------------------------ methods
def apply_method(model: nn.Module, cfg: FinetuneConfig, tokenizer=None) -> nn.Module:
    """Apply the module swaps / freezing of cfg.method to `model` (in place)."""
    m = cfg.method
    if m == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif m == "selective":
        s = cfg.selective
        select_trainable(model, s.modules, s.top_n_layers, s.attention_only)
    elif m in ("lora", "qlora"):
        if m == "qlora":
            quantize_model_nf4(model, cfg.qlora.quantize, cfg.qlora.blocksize, cfg.qlora.double_quant)
        lc = cfg.lora
        apply_lora(model, lc.targets, lc.r, lc.alpha, lc.dropout, lc.rslora)
    elif m == "adapter":
        apply_adapters(model, cfg.adapter.bottleneck, tuple(cfg.adapter.where))
    elif m == "prompt":
        init = tokenizer.encode(cfg.prompt.init_text, add_bos=False) if cfg.prompt.init_text and tokenizer else None
        apply_prompt_tuning(model, cfg.prompt.n_tokens, init_ids=init, seed=cfg.seed)
    elif m == "llama-adapter":
        apply_llama_adapter(model, cfg.llama_adapter.adapter_len, cfg.llama_adapter.n_layers)
    return model


# ------------------------------------------------------------------ loss
def sft_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits (B, T, V) for a batch: with document masking and per-document positions (packed rows),
    or plainly. A soft prompt (prompt tuning) is the model's own prefix, put in front by its forward."""
    if "doc" in batch:
        return model(batch["idx"], input_pos=batch["input_pos"], attn_mask=document_mask(batch["doc"]))
    return model(batch["idx"])


def sft_loss(model: nn.Module, batch: dict, _targets=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over completion tokens (targets -100 elsewhere); (loss, ce) for train_step."""
    ce = cross_entropy(sft_logits(model, batch), batch["targets"])
    return ce, ce


@torch.no_grad()
def val_loss(model: nn.Module, examples, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean completion loss over the validation examples (one example per row)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = pad_batch(examples[i:i + batch_size], pad_id)
        logits = sft_logits(model, b)
        n = int((b["targets"] != -100).sum())
        total += float(cross_entropy(logits, b["targets"])) * n
        count += n
    model.train(was)
    return total / max(count, 1)


# ------------------------------------------------------------------ the run
def finetune(cfg: FinetuneConfig, model: nn.Module | None = None, tokenizer=None, quiet: bool = False) -> dict:
    """Fine-tune and write the result to cfg.out. `model`/`tokenizer` may be given directly (tests);
    otherwise cfg.model is loaded. Returns the summary dict (also written to finetune.json)."""
    cfg.validate()
    out = Path(cfg.out)
    check_overwrite(out, cfg.force)  # fail now, not after training
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None:
        from ..loading import load_model

        model, tokenizer = load_model(cfg.model, adapter=cfg.base_adapter)
        if cfg.base_adapter:
            from ..peft import unload

            with torch.no_grad():
                unload(model, merge=True)  # continue from base + adapter as one plain model
    if tokenizer is None:
        raise LLMKitError(f"model {cfg.model!r} comes without a tokenizer; fine-tuning needs one for the chat template")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    data = load_sft_data(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed, cfg.system, cfg.max_records)
    val = data.val[: cfg.max_val_examples]

    mem_before = memory_report(model)
    apply_method(model, cfg, tokenizer)
    if cfg.seq_len > model.max_tokens:  # e.g. prompt tuning's virtual tokens take positions of the window
        raise LLMKitError(f"seq_len {cfg.seq_len} does not fit the {model.max_tokens} tokens the model takes "
                          f"(context window {model.cfg.max_seq_len}, less {model.n_prefix} for its prefix): "
                          f"set seq_len <= {model.max_tokens}")
    model.train()
    params = trainable_summary(model)
    mem_after = memory_report(model)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    optimizer = build_adamw(model, lr=lr, weight_decay=cfg.weight_decay)
    stream = example_stream(data.train, data.weights, cfg.seed)
    carry: list = []

    def next_batch() -> dict:
        if cfg.packing:
            return packed_batch(stream, cfg.batch_size, cfg.seq_len, pad_id, carry)
        return pad_batch([next(stream) for _ in range(cfg.batch_size)], pad_id)

    metrics_tmp = out.parent / f".{out.name}.metrics.jsonl"
    logger = MetricsLogger(metrics_tmp, tensorboard=False)
    val_before = val_loss(model, val, cfg.batch_size, pad_id) if val else None
    if val_before is not None:
        logger.log({"step": 0, "val_loss": val_before})
    bar = progress_bar(cfg.max_steps, enabled=not quiet, desc=f"finetune[{cfg.method}]")
    t0, tokens, last_val = time.perf_counter(), 0, val_before
    for step in range(cfg.max_steps):
        cur = lr_at(step, max_lr=lr, total_steps=cfg.max_steps, warmup_steps=min(cfg.warmup_steps, cfg.max_steps),
                    min_lr=lr * cfg.min_lr_ratio, kind=cfg.schedule)
        set_lr(optimizer, cur)
        micro = [next_batch() for _ in range(cfg.grad_accum)]
        tokens += sum(int((b["targets"] != -100).sum()) for b in micro)
        stats = train_step(model, optimizer, [(b, b["targets"]) for b in micro], loss_fn=sft_loss,
                           grad_clip=cfg.grad_clip)
        if not math.isfinite(stats["loss"]):
            raise LLMKitError(f"loss became {stats['loss']} at step {step + 1}; lower the learning rate (lr={lr})")
        rec = {"step": step + 1, "loss": stats["loss"], "lr": cur, "grad_norm": stats["grad_norm"],
               "completion_tokens": tokens, "elapsed_s": time.perf_counter() - t0}
        if val and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            rec["val_loss"] = last_val = val_loss(model, val, cfg.batch_size, pad_id)
        if (step + 1) % cfg.log_every == 0 or "val_loss" in rec:
            logger.log(rec)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        bar.update(1)
    bar.close()
    logger.close()
    elapsed = time.perf_counter() - t0
    model.eval()

    summary = {
        "method": cfg.method, "model": cfg.model, "data": data.files, "steps": cfg.max_steps,
        "train_examples": sum(len(t) for t in data.train), "val_examples": len(val), "dropped_examples": data.dropped,
        "trainable_params": params["trainable"], "total_params": params["total"], "trainable_share": params["share"],
        "weights_bytes_before": mem_before["stored_bytes"], "weights_bytes_after": mem_after["stored_bytes"],
        "val_loss_before": val_before, "val_loss_after": last_val,
        "train_seconds": elapsed, "completion_tokens": tokens,
    }
    if cfg.method == "prompt":
        summary["prompt_nearest_tokens"] = [t for _, _, t, _ in nearest_tokens(model, tokenizer)]
    resolved = dataclasses.asdict(cfg)
    if cfg.method in ("full", "selective"):
        from ..checkpoint import save_checkpoint

        save_checkpoint(model, out, tokenizer=tokenizer, meta={"finetune": resolved}, force=True)
    else:
        save_adapter(model, out, base_model=cfg.model, force=True,
                     extra={"finetune": resolved, "nf4_base": cfg.method == "qlora"})
    os.replace(metrics_tmp, out / "metrics.jsonl")
    plot_metrics(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"fine-tuning ({cfg.method})")
    atomic_write_json(out / "finetune.json", {"config": resolved, "summary": summary})
    return summary


def summary_lines(s: dict) -> list[str]:
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
