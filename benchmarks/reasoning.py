"""Direct vs chain-of-thought vs self-consistency vs PAL on GSM8K and SVAMP with SmolLM2-135M-Instruct.

    PYTHONPATH=. nice -n 19 python benchmarks/reasoning.py --limit 50 [--methods direct,cot-fewshot,sc,pal]
        [--datasets gsm8k,svamp] [--out benchmarks/results/reasoning.jsonl] [--threads 2]

The first --limit problems of each test set (GSM8K test, SVAMP); shots are the first GSM8K-train problems
(cot-fewshot, sc: 4 worked solutions; direct: the same 4 with the final number only; PAL: its 3 programs),
all through the chat template. Each finished (dataset, method) appends one JSON line to --out (with the
per-question predictions), so a run cut short keeps what it finished; rerunning skips those. Prints the
markdown table: accuracy ± stderr (sqrt(p(1-p)/(n-1)), as `llmkit eval`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def table(rows: list[dict]) -> str:
    from llmkit.eval.harness import mean_stderr

    lines = ["| dataset | method | n | accuracy (%) | ± stderr | samples/question | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, se = mean_stderr([float(c) for c in r["correct"]])
        lines.append(f"| {r['dataset']} | {r['method']} | {r['n']} | {100 * m:.1f} | "
                     f"{'' if se is None else f'{100 * se:.1f}'} | {r['samples']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--methods", default="direct,cot-fewshot,pal,sc")
    ap.add_argument("--datasets", default="gsm8k,svamp")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/reasoning.jsonl")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args(argv)

    out = Path(args.out)
    done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    if args.table_only:
        print(table(done))
        return 0
    import torch

    from llmkit.apps.prompting import SolveConfig, default_pool, get_method, load_math, same_answer, solve
    from llmkit.loading import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    pool = default_pool()
    for ds in args.datasets.split(","):
        probs = load_math(ds, args.limit)
        for method in args.methods.split(","):
            if any(r["dataset"] == ds and r["method"] == method and r["n"] == len(probs) for r in done):
                continue
            m = get_method(method)
            # a direct answer is a few tokens; reasoning and programs get the full budget
            budget = 24 if method == "direct" else args.max_new_tokens
            cfg = SolveConfig(method=method, max_new_tokens=budget, batch_size=args.batch_size, chat=True)
            t0 = time.time()
            sols = solve(model, tok, [p["question"] for p in probs], pool, cfg, progress=True)
            correct = [same_answer(s.prediction, p["answer"]) for s, p in zip(sols, probs)]
            row = {"dataset": ds, "method": method, "n": len(probs), "samples": m.samples if cfg.samples is None
                   else cfg.samples, "wall_s": round(time.time() - t0, 1), "cpu": cpu_name(), "model": args.model,
                   "max_new_tokens": budget, "correct": correct,
                   "predictions": [s.prediction for s in sols], "gold": [p["answer"] for p in probs],
                   "first_output": [s.outputs[0][:400] for s in sols]}
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
