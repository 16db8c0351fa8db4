"""Fine-tuning benchmark: sentiment labelling of short product reviews with SmolLM2-135M-Instruct.

A small synthetic review set (built here, seeded; explicit and negated phrasings so it is not all
keyword spotting) is labelled "positive"/"negative". The automatic check reads the model's first
answer token after the chat template's generation prompt:
  exact  = its greedy first token is exactly the label word ("positive"/"negative"): task + format
  choice = P(positive) vs P(negative), each summed over the spellings positive/Positive/" positive"/
           " Positive" as first token, picks the right label (format ignored)
Scored zero-shot, few-shot in context (4 labelled examples in the prompt), and after fine-tuning
with each method (zero-shot prompt, the method's adapter/weights applied).

    python benchmarks/finetune_sentiment.py --method base        # zero-shot and few-shot scores
    python benchmarks/finetune_sentiment.py --method lora --steps 30
Each run prints one JSON line (trainable params and share, peak RSS, weights MiB, time, scores) and
appends it to --results. Run one method per process so the peak memory is the method's own.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

SYSTEM = "You label the sentiment of product reviews."
PRODUCTS = ["headphones", "blender", "laptop", "backpack", "phone case", "coffee maker", "desk lamp", "keyboard",
            "running shoes", "water bottle", "tent", "vacuum", "charger", "jacket", "monitor", "toaster", "drill",
            "umbrella", "mattress", "camera", "speaker", "kettle", "mouse", "printer"]
POS = ["Amazing {p}, works great!", "I love this {p}.", "The {p} is excellent and well made.",
       "Best {p} I have ever bought.", "Not bad at all, the {p} exceeded my expectations.",
       "The {p} arrived quickly and does exactly what it should.", "Really happy with this {p}, would buy again.",
       "I was worried, but the {p} turned out to be fantastic.", "Solid {p} for the price, no complaints.",
       "My whole family enjoys the {p}. Five stars."]
NEG = ["Terrible {p}, broke after a day.", "I hate this {p}.", "The {p} is cheap junk.",
       "Worst {p} I have ever bought.", "Not worth the money, the {p} stopped working.",
       "The {p} arrived damaged and support never answered.", "Really disappointed with this {p}, returning it.",
       "I wanted to like the {p}, but it is useless.", "The {p} looks nice but fails constantly.",
       "Do not buy this {p}. One star."]


def build_sets(seed: int = 0, n_test: int = 96):
    """All (template, product) pairs, shuffled; the test set uses templates x products unseen in train."""
    rng = random.Random(seed)
    items = [(t.format(p=p), "positive") for t in POS for p in PRODUCTS] + \
            [(t.format(p=p), "negative") for t in NEG for p in PRODUCTS]
    rng.shuffle(items)
    return items[n_test:], items[:n_test]


def user_prompt(review: str, shots=()) -> str:
    demo = "".join(f"Review: {r}\nSentiment: {lab}\n\n" for r, lab in shots)
    return f"{demo}Label this review as positive or negative.\nReview: {review}\nSentiment:"


@torch.no_grad()
def score(model, tok, test, shots=(), batch_size: int = 16) -> dict:
    from llmkit.recipes.finetune import sft_logits

    pos, neg = tok.encode("positive")[0], tok.encode("negative")[0]
    # "choice" sums the spellings a chat model may start its answer with
    pos_all = torch.tensor(sorted({tok.encode(w)[0] for w in ("positive", "Positive", " positive", " Positive")}))
    neg_all = torch.tensor(sorted({tok.encode(w)[0] for w in ("negative", "Negative", " negative", " Negative")}))
    exact = choice = 0
    model.eval()
    for i in range(0, len(test), batch_size):
        chunk = test[i:i + batch_size]
        seqs = [tok.encode(tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": user_prompt(r, shots)}],
                                                   add_generation_prompt=True)) for r, _ in chunk]
        T = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), T), tok.pad_id or 0, dtype=torch.long)
        for b, s in enumerate(seqs):
            idx[b, :len(s)] = torch.tensor(s)  # right padding: causal attention never sees it
        logits = sft_logits(model, {"idx": idx})
        last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]  # (B, V)
        for (_, lab), row in zip(chunk, last):
            want = pos if lab == "positive" else neg
            exact += int(int(row.argmax()) == want)
            says_pos = bool(row[pos_all].logsumexp(0) > row[neg_all].logsumexp(0))
            choice += int(says_pos == (lab == "positive"))
    return {"exact": exact / len(test), "choice": choice / len(test)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--method", required=True, help="base | full | selective | lora | qlora | adapter | prompt | llama-adapter")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default="benchmarks/results/finetune_sentiment.jsonl")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmkit.loading import load_model

    train, test = build_sets()
    model, tok = load_model(args.model)
    rec = {"method": args.method, "model": args.model, "n_train": len(train), "n_test": len(test)}
    t0 = time.perf_counter()
    if args.method == "base":
        rec["zero_shot"] = score(model, tok, test)
        shots = [train[i] for i in range(4)]
        rec["few_shot"] = score(model, tok, test, shots=shots)
    else:
        from llmkit.config import load_config
        from llmkit.recipes.finetune import FinetuneConfig, finetune

        with tempfile.TemporaryDirectory() as d:
            data = Path(d) / "train.jsonl"
            data.write_text("".join(json.dumps({"messages": [
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": user_prompt(r)},
                {"role": "assistant", "content": lab}]}) + "\n" for r, lab in train))
            over = [f"method={args.method}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                    "data.val_fraction=0.05", f"train.eval_every={args.steps}", "data.seq_len=128",
                    "optim.warmup_steps=3", f"train.threads={args.threads}", "train.ckpt_every=0",
                    "lora.dropout=0.0"] + args.overrides
            if args.lr:
                over.append(f"optim.lr={args.lr}")
            cfg = load_config(FinetuneConfig, None, over)
            cfg.model, cfg.data.files, cfg.train.out_dir = args.model, [str(data)], str(Path(d) / "out")
            s = finetune(cfg, model=model, tokenizer=tok, quiet=False)
        rec.update({k: s[k] for k in ("trainable_params", "total_params", "trainable_share", "train_seconds",
                                      "val_loss_before", "val_loss_after", "weights_bytes_before",
                                      "weights_bytes_after", "steps")})
        if "prompt_nearest_tokens" in s:
            rec["prompt_nearest_tokens"] = s["prompt_nearest_tokens"]
        rec["after"] = score(model, tok, test)
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/loadavg") as f:
        rec["loadavg"] = f.read().split()[:3]
    line = json.dumps(rec)
    print(line)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
