"""Sequence-classification fine-tuning of a BERT encoder: the finetune recipe's `task=classify`
(recipes/finetune.py hands the run here), e.g. BoolQ or sentiment on all-MiniLM-L6-v2.

    llmkit finetune --model minilm-l6-v2 --data boolq.jsonl --out runs/boolq task=classify method=full

Data: JSONL records {"text", "label"}, or a sentence pair {"text", "text_pair", "label"} (BoolQ-style
{"question", "passage", "label"} is read as text=question, text_pair=passage). Labels are strings
or ints; the classes are the sorted distinct labels of the data (or the head's own, when the model
already has a classifier). Input: [CLS] text [SEP] (text_pair [SEP]) with token types 0 / 1, cut to
data.seq_len (the pair's second text is cut first). Model: the encoder + BERT's pooler + a linear
classifier (models/encoder.py, BertForSequenceClassification's layout); the loss is the mean
cross-entropy over the batch, all weights train (method=full).

The loop is the shared one (train_step, LR schedule, accumulation, clipping, metrics, resumable step
checkpoints of OUT.partial); validation reports loss and accuracy on a held-out split (data.val_fraction
of the records, drawn with train.seed), before training, every train.eval_every steps and at the end.
OUT is a Hugging Face BertForSequenceClassification folder (transformers loads it) + finetune.json.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LLMKitError
from ..finetune.data import read_records
from ..models.encoder import Encoder, save_encoder
from ..train import checkpoint as ckpt
from ..train.dist import init_distributed, unwrap, wrap_model
from ..train.loop import MetricsLogger, autocast_context, plot_metrics, progress_bar, train_step
from ..train.optim import OPTIMIZERS
from ..train.schedule import lr_at, set_lr
from .common import finish_run, restore, seed_torch, start_point
from .config import check_inputs, check_sections, every


@dataclass
class Example:
    ids: list[int]
    types: list[int]
    label: int


def read_labelled(files: list[str], max_records: int | None = None) -> list[tuple[str, str | None, object]]:
    """[(text, text_pair or None, label)] from JSONL files; a one-line error names a bad record."""
    out = []
    for f in files:
        path = Path(f.rsplit(":", 1)[0] if ":" in f and not Path(f).exists() else f)
        if not path.is_file():
            raise LLMKitError(f"data file {path} does not exist")
        for line, r in read_records(path)[:max_records]:
            if not isinstance(r, dict):
                raise LLMKitError(f"{path}:{line}: not a JSON object")
            text, pair = r.get("text", r.get("question")), r.get("text_pair", r.get("passage"))
            if not isinstance(text, str) or "label" not in r or not isinstance(r["label"], (str, int, bool)):
                raise LLMKitError(f"{path}:{line}: a classification record needs a \"text\" string and a \"label\" "
                                  "(string or int), optionally \"text_pair\"")
            out.append((text, pair if isinstance(pair, str) else None, r["label"]))
    if not out:
        raise LLMKitError("no classification records in the data files")
    return out


def encode_pair(tokenizer, text: str, pair: str | None, seq_len: int) -> tuple[list[int], list[int]]:
    """[CLS] a [SEP] (b [SEP]) and token types, within seq_len (b is cut first, then a)."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise LLMKitError("the encoder's tokenizer has no [CLS]/[SEP]: not a BERT vocabulary")
    a = tokenizer.encode(text, add_bos=False)
    b = tokenizer.encode(pair, add_bos=False) if pair is not None else None
    room = seq_len - 2 - (1 if b is not None else 0)
    if room < 1:
        raise LLMKitError(f"data.seq_len {seq_len} leaves no room for text")
    if b is not None:
        b = b[:max(0, room - len(a))]
    a = a[:room - (len(b) if b else 0)]
    ids = [cls] + a + [sep] + (b + [sep] if b is not None else [])
    return ids, [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])


def pad(examples: list[Example], pad_id: int) -> dict:
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    types = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)], types[i, :len(e.ids)], mask[i, :len(e.ids)] = (
            torch.tensor(e.ids), torch.tensor(e.types), 1)
    return {"ids": ids, "types": types, "mask": mask, "labels": torch.tensor([e.label for e in examples])}


def classify_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of the classifier's logits (B, K) against the labels (B,); and accuracy."""
    logits = unwrap(model).classifier(unwrap(model).pool(model(batch["ids"], batch["mask"],
                                                                token_types=batch["types"])))
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return loss, {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> dict:
    """Loss and accuracy over `examples` (longest first: batches pad little)."""
    was = model.training
    model.eval()
    order = sorted(examples, key=lambda e: -len(e.ids))
    loss = correct = 0.0
    for i in range(0, len(order), batch_size):
        b = {k: v.to(device) for k, v in pad(order[i:i + batch_size], pad_id).items()}
        logits = model.classify(b["ids"], b["mask"], b["types"]).float()
        loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
    model.train(was)
    return {"val_loss": loss / max(len(examples), 1), "val_accuracy": correct / max(len(examples), 1)}


class Batches:
    """Endless shuffled passes over the training examples (a new permutation each epoch, from the seed);
    resumable: the state is the number of batches drawn, replayed on load."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.B, self.seed = examples, batch_size, seed
        self.drawn, self.order, self.pos, self.epoch = 0, [], 0, 0

    def next(self) -> list[Example]:
        out = []
        while len(out) < self.B:
            if self.pos == len(self.order):
                self.order = list(range(len(self.examples)))
                random.Random(self.seed * 7919 + self.epoch).shuffle(self.order)
                self.pos, self.epoch = 0, self.epoch + 1
            out.append(self.examples[self.order[self.pos]])
            self.pos += 1
        self.drawn += 1
        return out

    def state_dict(self) -> dict:
        return {"batches": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        while self.drawn < state["batches"]:
            self.next()


def finetune_classifier(cfg, model: Encoder | None = None, tokenizer=None, quiet: bool = False,
                        resume: bool | str = False, force: bool = False) -> dict:
    """Run `cfg` (a FinetuneConfig with task=classify); returns the summary (also in OUT/finetune.json)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    if cfg.method != "full":
        raise LLMKitError(f"task=classify trains the whole encoder and its head: set method=full (got {cfg.method})")
    check_inputs(cfg)
    info = init_distributed(t.device)
    if info.world > 1:
        raise LLMKitError("task=classify runs in one process (no torchrun)")
    micro, _ = check_sections(d, o, t, info.world)
    out = Path(t.out_dir)
    partial, ckpt_root, start_ckpt = start_point(out, resume, force, info)
    seed_torch(t)

    records = read_labelled(d.files, d.max_records)
    random.Random(t.seed).shuffle(records)
    if model is None:
        from ..loading import resolve_encoder
        from ..tokenizer import Tokenizer

        path = resolve_encoder(cfg.model)
        model = Encoder.from_dir(path)
        tokenizer = Tokenizer.from_dir(path)
    if model.classifier is None:  # a fresh head over the data's classes, in sorted order
        classes = sorted({str(r[2]) for r in records})
        if len(classes) < 2:
            raise LLMKitError(f"the data has one class only ({classes[0]!r}): nothing to classify")
        # the pooler (unless the base has one) and the classifier start fresh; a masked-LM head is dropped
        head = Encoder(dataclasses.replace(model.cfg, num_labels=len(classes), labels=tuple(classes), mlm_head=False))
        head.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mlm.")}, strict=False)
        model = head
    classes = list(model.cfg.labels) or [str(i) for i in range(model.cfg.num_labels)]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(r[2]) for r in records} - set(index))
    if unknown:
        raise LLMKitError(f"label {unknown[0]!r} is not one of the model's classes {classes}")
    seq_len = min(d.seq_len, model.cfg.max_seq_len)
    examples = [Example(*encode_pair(tokenizer, a, b, seq_len), index[str(lab)]) for a, b, lab in records]
    n_val = min(d.max_val_examples, int(len(examples) * d.val_fraction))
    val, train = examples[:n_val], examples[n_val:]
    if not train:
        raise LLMKitError("no training records left after the validation split (lower data.val_fraction)")
    pad_id = model.cfg.pad_token_id

    model.to(info.device).train()
    model = wrap_model(model, t.strategy, info)
    lr, min_lr = o.peak(2e-5)  # BERT fine-tuning's usual rate (Devlin et al. 2019, §4)
    optimizer = OPTIMIZERS[o.name](model, lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    autocast = autocast_context(info.device, t.dtype)
    batches = Batches(train, t.batch_size, t.seed)
    start_step, state = restore(start_ckpt, model, optimizer, batches)
    run_state = state.get("loader", {})
    logger = MetricsLogger(partial / "metrics.jsonl", enabled=True, tensorboard=False,
                           resume_step=start_step if start_ckpt else None)
    before = run_state["val_before"] if start_ckpt else (evaluate(model, val, micro, pad_id, info.device) if val
                                                          else {})
    if before and not start_ckpt:
        logger.log({"step": 0, **before})
    last = run_state.get("last_val", before)
    elapsed_before = run_state.get("elapsed_s", 0.0)
    bar = progress_bar(t.steps, start_step, enabled=not quiet and t.progress, desc="finetune[classify]")
    t0 = time.perf_counter()
    for step in range(start_step + 1, t.steps + 1):
        cur = lr_at(step - 1, max_lr=lr, total_steps=t.steps, warmup_steps=min(o.warmup_steps, t.steps),
                    min_lr=min_lr, kind=o.schedule)
        set_lr(optimizer, cur)
        g = batches.next()
        micro_batches = [{k: v.to(info.device) for k, v in pad(g[i:i + micro], pad_id).items()}
                         for i in range(0, len(g), micro)]
        stats = train_step(model, optimizer, micro_batches, loss_fn=classify_loss, grad_clip=o.grad_clip,
                           autocast=autocast)
        if not math.isfinite(stats["loss"]):
            raise LLMKitError(f"loss became {stats['loss']} at step {step}; lower the learning rate (optim.lr={lr})")
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"step": step, "loss": stats["loss"], "accuracy": stats["accuracy"], "lr": cur,
               "grad_norm": stats["grad_norm"], "elapsed_s": elapsed}
        if val and (every(t.eval_every, step) or step == t.steps):
            last = evaluate(model, val, micro, pad_id, info.device)
            rec.update(last)
        if every(t.log_every, step) or "val_loss" in rec or step == t.steps:
            logger.log(rec)
        if every(t.ckpt_every, step) and step < t.steps:
            ckpt.save_train_state(ckpt_root, step, model, optimizer,
                                  {**batches.state_dict(), "val_before": before, "last_val": last, "elapsed_s": elapsed},
                                  dataclasses.asdict(cfg), {"loss": stats["loss"]}, keep=t.keep_last,
                                  trainable_only=True)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", **({"val_acc": f"{last['val_accuracy']:.3f}"} if last else {}))
        bar.update(1)
    bar.close()
    logger.close()
    model = unwrap(model).eval()
    majority = max(sum(e.label == k for e in val) for k in range(len(classes))) / len(val) if val else None
    summary = {"task": "classify", "method": cfg.method, "model": cfg.model, "data": list(d.files),
               "classes": classes, "steps": t.steps, "train_examples": len(train), "val_examples": len(val),
               "val_majority_accuracy": majority,
               "val_loss_before": before.get("val_loss"), "val_accuracy_before": before.get("val_accuracy"),
               "val_loss_after": last.get("val_loss") if last else None,
               "val_accuracy_after": last.get("val_accuracy") if last else None,
               "train_seconds": time.perf_counter() - t0 + elapsed_before}
    resolved = dataclasses.asdict(cfg)
    save_encoder(model, out, tokenizer, force=True)
    finish_run(out, partial, "finetune", resolved, summary,
               lambda records: plot_metrics(records, out / "loss.png", title="fine-tuning (classify)"))
    return summary


def summary_lines(s: dict) -> list[str]:
    lines = [f"classify {len(s['classes'])} classes ({', '.join(s['classes'][:6])}): {s['steps']} steps in "
             f"{s['train_seconds']:.1f}s on {s['train_examples']:,} examples"]
    if s["val_accuracy_before"] is not None:
        lines.append(f"val accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy_after']:.3f} on "
                     f"{s['val_examples']} held-out examples (majority class {s['val_majority_accuracy']:.3f}); "
                     f"val loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}")
    return lines
