"""`llmkit prompt`: answer questions with a prompting method (direct, chain of thought, self-consistency,
PAL), or score a method on GSM8K / SVAMP.

    llmkit prompt --model smollm2-135m-instruct --method sc "Tom has 3 apples and buys 4 more. How many?"
    llmkit prompt --model M --method pal --data svamp --limit 20 --json
    llmkit prompt --model M --method cot-fewshot --show-prompt "..."   # print the prompt, run nothing
"""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    from ..apps.prompting import METHODS, SELECTIONS

    p = sub.add_parser("prompt", help="zero/few-shot, chain-of-thought, self-consistency and PAL prompting",
                       description="Methods: " + ", ".join(f"{k} ({m.help})" for k, m in METHODS.items())
                       + ", pal (the model writes Python; the sandbox runs it).")
    p.add_argument("question", nargs="?", help="the question (or use --data)")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF dir or llmkit checkpoint")
    p.add_argument("--method", default="cot-fewshot", help="direct | cot | cot-fewshot | sc | pal (default cot-fewshot)")
    p.add_argument("--shots", type=int, default=None, help="number of examples (default: the method's)")
    p.add_argument("--select", default="first", choices=SELECTIONS, help="how shots are chosen (default first)")
    p.add_argument("--shots-file", help="GSM8K-format JSONL of worked examples (default: GSM8K train)")
    p.add_argument("--no-chat", action="store_true", help="plain text prompts instead of the chat template")
    p.add_argument("--samples", type=int, default=None, help="sampled paths to vote over (sc default 5)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (sc default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="gsm8k | svamp | FILE.jsonl: score the method on it instead of one question")
    p.add_argument("--limit", type=int, default=None, help="first N problems of --data")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt of the question and stop")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..apps.prompting import (SolveConfig, default_pool, get_method, gsm8k_shots, load_math, make_prompts,
                                  same_answer, sentence_embedder, solve)
    from ..errors import LLMKitError

    get_method(args.method)  # a typo fails before the model loads
    if (args.question is None) == (args.data is None):
        raise LLMKitError("give a question or --data (gsm8k, svamp or a JSONL file), not both")
    for name, v, lo in (("--shots", args.shots, 0), ("--samples", args.samples, 1), ("--limit", args.limit, 1),
                        ("--max-new-tokens", args.max_new_tokens, 1)):
        if v is not None and v < lo:
            raise LLMKitError(f"{name} must be >= {lo}, got {v}")
    pool = gsm8k_shots(args.shots_file) if args.shots_file else default_pool()
    probs = load_math(args.data, args.limit) if args.data else [{"question": args.question, "answer": None}]
    cfg = SolveConfig(method=args.method, shots=args.shots, select=args.select, chat=not args.no_chat,
                      samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                      seed=args.seed)
    embed = sentence_embedder() if args.select == "similar" else None
    import torch

    torch.set_num_threads(max(1, args.threads))
    from .generate import load

    model, tok = load(args.model, args)
    if args.show_prompt:
        print(make_prompts([probs[0]["question"]], pool, cfg, tok, embed)[0])
        return 0
    sols = solve(model, tok, [p["question"] for p in probs], pool, cfg, embed, progress=args.data is not None)
    if args.data is None:
        s = sols[0]
        if args.json:
            print(json.dumps(s.to_dict(), indent=2))
        else:
            for i, out in enumerate(s.outputs):
                if len(s.outputs) > 1:
                    print(f"--- sample {i + 1}: answer {s.answers[i]}")
                print(out.strip())
            if len(s.outputs) > 1:
                print(f"--- votes {s.votes}")
            print(f"answer: {s.prediction}")
        return 0
    from ..eval.harness import mean_stderr

    correct = [float(same_answer(s.prediction, p["answer"])) for s, p in zip(sols, probs)]
    acc, se = mean_stderr(correct)
    report = {"model": args.model, "method": args.method, "data": args.data, "n": len(probs), "accuracy": acc,
              "stderr": se, "records": [{"question": p["question"], "gold": p["answer"], "prediction": s.prediction,
                                          "votes": s.votes, "outputs": s.outputs} for s, p in zip(sols, probs)]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(f"{args.data} {args.method}: accuracy {100 * acc:.1f}%"
                         + (f" ± {100 * se:.1f}" if se is not None else "") + f" (n={len(probs)})\n")
    return 0
