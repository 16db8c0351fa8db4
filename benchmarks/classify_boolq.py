"""Sequence-classification benchmark: BoolQ (Clark et al. 2019) yes/no answers with all-MiniLM-L6-v2 +
a classification head, fine-tuned through the finetune recipe (task=classify, method=full).

The shared data's BoolQ (multiple_choice/boolq.jsonl, 3,270 dev questions as llm-foundry ships them:
"Passage: ...\\nQuestion: ...", choices no/yes) is converted to {"question", "passage", "label"};
the recipe holds out data.val_fraction of it (shuffled with train.seed) and reports held-out accuracy
before and after training, beside the majority-class rate.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/classify_boolq.py --steps 100
Prints one JSON line and appends it to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path


def convert(src: Path, dst: Path) -> int:
    n = 0
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            r = json.loads(line)
            m = re.fullmatch(r"Passage: (.*)\nQuestion: (.*)", r["query"], re.S)
            out.write(json.dumps({"question": m.group(2), "passage": m.group(1),
                                  "label": r["choices"][r["gold"]]}) + "\n")
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--val", type=int, default=400, help="held-out examples")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "classify_boolq.jsonl"))
    args = ap.parse_args()

    from llmkit.config import load_config
    from llmkit.recipes.finetune import FinetuneConfig, finetune

    data = Path(os.environ.get("LLMKIT_SHARED_DATA", "../shared/data")) / "multiple_choice" / "boolq.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        conv = Path(tmp) / "boolq.jsonl"
        n = convert(data, conv)
        cfg = load_config(FinetuneConfig, None, [
            "model=minilm-l6-v2", "task=classify", "method=full", f"train.out_dir={tmp}/out",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}",
            f"optim.lr={args.lr}", "optim.warmup_steps=10", "train.eval_every=0", "train.ckpt_every=0",
            f"data.val_fraction={args.val / n}", f"data.max_val_examples={args.val}", "train.threads=1"])
        cfg.data.files = [str(conv)]
        s = finetune(cfg)
    row = {k: s[k] for k in ("model", "steps", "train_examples", "val_examples", "val_majority_accuracy",
                              "val_accuracy_before", "val_accuracy_after", "val_loss_before", "val_loss_after",
                              "train_seconds")}
    row.update(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
    print(json.dumps(row))
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
