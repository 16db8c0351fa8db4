"""RM-judged win rate of an aligned adapter against its base model (issue 16, item 8).

For the held-out prompts of a preference file (the same split the DPO recipe holds out: same seq_len,
val_fraction and seed), generate one answer with the base model (adapter switched off, so no second
copy) and one with the aligned adapter, greedy by default, and score both with a reward model. A win is
r(aligned) > r(base); ties (identical answers) are counted apart. Writes every answer and both rewards
to --out (JSONL) so the numbers can be read back.

    python benchmarks/align_winrate.py --model smollm2-135m-instruct --adapter runs/dpo \
        --reward-model runs/hh-rm --data ../shared/data/preference/dpo_en_demo.json --seq-len 384 \
        --val-fraction 0.1 --seed 0 --max-new-tokens 128 --out runs/winrate.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from llmkit.align.data import load_preference_data
from llmkit.align.reward import check_same_tokenizer, load_reward_model, score_batches
from llmkit.inference import SamplingParams
from llmkit.inference.generate import generate_batch
from llmkit.io import atomic_path
from llmkit.loading import load_model
from llmkit.peft import disabled
from llmkit.progress import progress_bar


def answers(model, prompts, params, batch: int, desc: str):
    """Completion token ids (end-of-turn appended when the model stopped), `batch` prompts at a time."""
    out = []
    for i in progress_bar(iterable=range(0, len(prompts), batch), desc=desc, unit="batch"):
        for g in generate_batch(model, prompts[i:i + batch], params):
            c = g.completions[0]
            out.append(list(c.tokens) + (list(params.stop_ids[:1]) if c.finish_reason == "stop" else []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True, help="the aligned adapter (llmkit align --method dpo --out)")
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N held-out prompts (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, adapter=a.adapter)
    rm, rm_tok = load_reward_model(a.reward_model)
    check_same_tokenizer(rm_tok, tok)
    rm.eval()
    data = load_preference_data(a.data.split(","), tok, a.seq_len, a.val_fraction, a.seed)
    prompts = [p.prompt_ids for p in data.val][: a.limit or None]
    params = SamplingParams(temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                            stop_ids=(tok.eos_id,), seed=a.seed)
    with torch.inference_mode():
        aligned = answers(model, prompts, params, a.batch, "aligned")
        with disabled(model):
            base = answers(model, prompts, params, a.batch, "base")
        r_al = score_batches(rm, [p + c for p, c in zip(prompts, aligned)])
        r_b = score_batches(rm, [p + c for p, c in zip(prompts, base)])
    r_b = [x if s else y for x, y, s in zip(r_al, r_b, [c1 == c0 for c1, c0 in zip(aligned, base)])]
    # a tie is the same answer from both (its two rewards can differ in the last bits: padding differs)
    same = [c1 == c0 for c1, c0 in zip(aligned, base)]
    wins = sum(x > y and not s for x, y, s in zip(r_al, r_b, same))
    ties = sum(same)
    n = len(prompts)
    diffs = [x - y for x, y in zip(r_al, r_b)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
    with atomic_path(a.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p, c1, c0, x, y in zip(prompts, aligned, base, r_al, r_b):
            f.write(json.dumps({"prompt": tok.decode(p), "aligned": tok.decode(c1, skip_special_tokens=True),
                                "base": tok.decode(c0, skip_special_tokens=True), "r_aligned": x, "r_base": y}) + "\n")
    dec = n - ties
    summary = {"prompts": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
               "win_rate_decided": wins / dec if dec else float("nan"),
               "win_rate_ties_half": (wins + ties / 2) / n,
               "stderr": math.sqrt(max((wins + ties / 2) / n * (1 - (wins + ties / 2) / n), 0) / n),
               "mean_reward_diff": mean, "sd_reward_diff": sd,
               "mean_len_aligned": sum(map(len, aligned)) / n, "mean_len_base": sum(map(len, base)) / n,
               "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
