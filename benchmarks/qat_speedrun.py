"""Quantization-aware training vs post-training quantization on the speedrun model, at 4, 3 and 2 bits.

    PYTHONPATH=. python benchmarks/qat_speedrun.py --model /work/models/speedrun/pretrain/final \
        --data-dir /work/models/speedrun/data --bits 4,3,2 --steps 150 --out benchmarks/results/quant/qat_speedrun.jsonl

For each bit width b (method int{b}-asym-b32 unless --grain says otherwise):
  ptq      the pretrained model quantized as it is (`llmkit quantize`)
  ft+ptq   control: the same full fine-tune without QAT (same steps, data, LR), then quantized, so the
           gain of QAT is not just "more training"
  qat      full fine-tune with fake quantization (`llmkit finetune method=full qat=int{b}-...`), converted
           to the real quantized checkpoint at the end
each scored on the speedrun's held-out text (the last 10% of tinyshakespeare, never trained on): bits per
byte of its first --heldout-chars characters, windows of the model's context every half context.
Fine-tuning data: the speedrun's own training text (first 90%) cut into plain-text records.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def score(model, tok, text: str) -> float:
    from llmkit.eval.perplexity import perplexity

    return perplexity(model, tok, [text], context=model.max_tokens)["bits_per_byte"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/models/speedrun/pretrain/final")
    ap.add_argument("--data-dir", default="/work/models/speedrun/data")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--grain", default="asym-b32")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout-chars", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/qat_speedrun")
    ap.add_argument("--out")
    a = ap.parse_args()

    import torch

    from llmkit.config import load_config
    from llmkit.loading import load_model
    from llmkit.quant import quantize
    from llmkit.recipes.finetune import FinetuneConfig, finetune

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    heldout = Path(a.data_dir, "heldout.txt").read_text(encoding="utf-8")[: a.heldout_chars]
    train = Path(a.data_dir, "train.txt").read_text(encoding="utf-8")
    records = work / "train.jsonl"
    if not records.exists():  # ~250-token records of whole lines (seq_len 256)
        with open(records, "w") as f:
            chunk = ""
            for line in train.splitlines(keepends=True):
                chunk += line
                if len(chunk) > 480:
                    f.write(json.dumps({"text": chunk}) + "\n")
                    chunk = ""
    base, tok = load_model(a.model)
    seq = base.max_tokens
    env = {"load_avg_start": [round(x, 1) for x in os.getloadavg()], "threads": a.threads, "steps": a.steps,
           "lr": a.lr, "batch_size": a.batch_size, "seq_len": seq, "heldout_chars": a.heldout_chars}

    def emit(row):
        row = {**row, **env}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    emit({"variant": "fp32", "bits": 32, "bpb": score(base, tok, heldout)})

    def run_ft(name: str, qat: str) -> tuple[Path, float]:
        out = work / name
        if not out.exists():
            cfg = load_config(FinetuneConfig, None, [
                f"model={a.model}", "method=full", f"qat={qat}", f"train.out_dir={out}", f"data.files={records}",
                f"train.steps={a.steps}", f"train.batch_size={a.batch_size}", f"data.seq_len={seq}",
                f"optim.lr={a.lr}", "optim.warmup_steps=10", "train.eval_every=0", "train.ckpt_every=0",
                "train.progress=false", "data.val_fraction=0.02", f"train.threads={a.threads}"])
            t0 = time.perf_counter()
            finetune(cfg, quiet=True)
            return out, time.perf_counter() - t0
        return out, float("nan")

    ft, ft_s = run_ft("ft-fp32", "")
    ft_model, _ = load_model(str(ft))
    emit({"variant": "ft fp32 (control)", "bits": 32, "bpb": score(ft_model, tok, heldout), "train_s": ft_s})
    for b in [int(x) for x in a.bits.split(",")]:
        method = f"int{b}-{a.grain}"
        m, _ = load_model(a.model)
        emit({"variant": "ptq", "bits": b, "method": method, "bpb": score(quantize(m, method), tok, heldout)})
        m, _ = load_model(str(ft))
        emit({"variant": "ft+ptq", "bits": b, "method": method, "bpb": score(quantize(m, method), tok, heldout)})
        q, q_s = run_ft(f"qat-{method}", method)
        m, _ = load_model(str(q))  # the converted, really quantized checkpoint
        emit({"variant": "qat", "bits": b, "method": method, "bpb": score(m, tok, heldout), "train_s": q_s})


if __name__ == "__main__":
    main()
