"""Pieces of a training loop, shared by the pretraining, fine-tuning and alignment recipes.

    train_step     one optimiser step over micro-batches with the recipe's loss_fn (accumulation, clipping, autocast)
    lm_loss        the pretraining loss_fn: next-token cross-entropy (+ MoE load-balancing loss, + MTP loss)
    seq2seq_loss   the encoder-decoder loss_fn (T5 span corruption)
    evaluate       validation loss, perplexity and bits per byte
    sample_text    a short generated sample to watch progress
    MetricsLogger  JSONL (+ TensorBoard when installed), truncated on resume so curves stay exact
    plot_metrics   loss-curve PNG
    progress_bar   llmkit.progress's bar (tqdm on a terminal, a plain line every few seconds in logs)
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..losses import cross_entropy
from ..progress import progress_bar  # noqa: F401  (re-exported: the recipes import it from here)
from .dist import all_reduce_sum, grad_sync, unwrap


def autocast_context(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (matmuls in bf16, weights and optimiser in fp32); fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 norm of all gradients (clipped to max_norm when > 0); works on DTensor (FSDP2) grads."""
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def lm_loss(model: nn.Module, batch: dict, aux_coef: float = 0.0, mtp_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Next-token loss for batch {"idx", "targets"} (B, T): (loss, {"loss", "ce"[, "aux_loss", "mtp_loss"]}).
    MoE models add coef · the load-balancing loss (Fedus et al. 2021); models with multi-token
    prediction add mtp_coef · the MTP loss (DeepSeek-V3 eq. 25, lambda). "ce" stays the plain
    next-token cross-entropy, comparable across runs."""
    ce = cross_entropy(model(batch["idx"]), batch["targets"])  # logits (B, T, V)
    inner = unwrap(model)
    loss, stats = ce, {"ce": ce}
    if mtp_coef and getattr(inner.cfg, "mtp_depth", 0):  # first: its MoE layers' router logits join aux_loss
        mtp = inner.mtp_loss(batch["targets"]).to(ce.device)
        loss = loss + mtp_coef * mtp
        stats["mtp_loss"] = mtp
    if aux_coef and getattr(inner.cfg, "n_expert", 0):
        aux = inner.aux_loss().to(ce.device)
        loss = loss + aux_coef * aux
        stats["aux_loss"] = aux
    return loss, {"loss": loss, **stats}


def seq2seq_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Encoder-decoder loss for batch {"idx" (B, S), "decoder_ids" (B, T), "targets" (B, T)[, "mask" (B, S)]}:
    cross-entropy of the decoder's logits against the targets (-100 ignored), e.g. T5 span corruption
    (train/span.py)."""
    ce = cross_entropy(model(batch["idx"], batch["decoder_ids"], batch.get("mask")), batch["targets"])
    return ce, {"loss": ce, "ce": ce}


def train_step(model: nn.Module, optimizer, micro_batches: Sequence[dict], *, loss_fn: Callable,
               grad_clip: float = 1.0, autocast=None) -> dict:
    """One optimiser step over M micro-batches (whatever the recipe builds: dicts of tensors).

    `loss_fn(model, batch) -> (loss, metrics)`: the recipe's objective (next-token CE, SFT, a
    preference loss...) and a dict of scalars to report. Each micro-batch contributes loss/M, so for
    equal-sized micro-batches the accumulated gradient is the full batch's; gradients are synchronised
    across ranks only on the last micro-batch. Returns the mean of each metric over the micro-batches
    plus "grad_norm" (before clipping)."""
    M = len(micro_batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, sync=i == M - 1), (autocast or contextlib.nullcontext()):
            loss, metrics = loss_fn(model, batch)
            (loss / M).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / M
    grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**sums, "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(model: nn.Module, read: Callable, windows: list, batch_size: int, bytes_per_token: float,
             device: torch.device, rank: int = 0, world: int = 1, autocast=None) -> dict:
    """Mean next-token loss over `windows` (each rank takes every world-th batch, sums are all-reduced),
    perplexity exp(loss), and bits per byte = loss · tokens/bytes / ln 2, fair across tokenizers."""
    model.eval()
    nll = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token NLL, token count)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    # under FSDP every rank must run the same number of forwards: pad with repeats, weight 0
    n_rounds = math.ceil(len(batches) / world)
    for r in range(n_rounds):
        j = r * world + rank
        x, y = read(batches[min(j, len(batches) - 1)])
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                 reduction="sum")
        if j < len(batches):
            nll[0] += loss.double()
            nll[1] += y.numel()
    all_reduce_sum(nll)
    model.train()
    loss = float(nll[0] / nll[1])
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer, prompt: str = "", max_new_tokens: int = 64,
                temperature: float = 0.8, seed: int = 0, device=None) -> str:
    """Sample a continuation (full recompute each step: fine for the small models trained here).
    Uses its own generator so sampling never disturbs the training RNG."""
    inner = unwrap(model)
    device = device or next(inner.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = tokenizer.encode(prompt, add_bos=False) if prompt else []
    if not ids:
        ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    start = len(ids)
    was_training = inner.training
    inner.eval()
    for _ in range(max_new_tokens):
        ctx = torch.tensor([ids[-inner.cfg.max_seq_len:]], device=device)
        logits = inner(ctx)[0, -1].float().cpu()  # (V,)
        probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    inner.train(was_training)
    return (prompt if prompt else "") + tokenizer.decode(ids[start:], skip_special_tokens=True)


class MetricsLogger:
    """Append-only JSONL of metric dicts (one per line, each with "step"); rank 0 only.

    On resume from step s, lines with step > s are dropped first, so the file reads exactly like
    a run that was never interrupted. Mirrors scalars to TensorBoard when it is installed.
    """

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # read (and validate) everything before rewriting anything: a bad file fails the resume
            # with the file unchanged
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL ([] when it does not exist). A run killed mid-append leaves a
    partial last line: it is dropped with a warning on stderr (the step checkpoint it belonged to
    was never completed either, so a resume loses nothing). A bad line anywhere else is damage this
    reader cannot explain away: an LLMKitError naming file:line."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LLMKitError(f"cannot read {p} ({e})") from None
    lines = text.split("\n")  # a complete file ends with "\n", so the last element is ""
    records = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            why = None if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"
        except ValueError as e:
            why = str(e)
        if why:
            if i == len(lines):  # the unterminated last line: an interrupted append
                print(f"llmkit: warning: {p}:{i}: dropped a truncated last line (an interrupted write)",
                      file=sys.stderr)
                break
            raise LLMKitError(f"{p}:{i}: not a metrics record ({why})")
        records.append(rec)
    return records


def plot_metrics(records: list[dict], out_png: str | Path, title: str = "training", x_key: str = "step") -> Path:
    """Loss curves (train loss; val loss when logged) against `x_key`, plus the LR, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), height_ratios=[3, 1], sharex=True)
    if train:
        ax.plot([r[x_key] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot([r[x_key] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val loss")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if train and "lr" in train[0]:
        ax_lr.plot([r[x_key] for r in train], [r["lr"] for r in train], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel(x_key)
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    from ..io import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
