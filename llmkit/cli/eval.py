"""`llmkit eval`: benchmark a model on multiple-choice and generative tasks."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    from ..devices import add_device_arg
    from ..eval.tasks import BUILTIN

    p = sub.add_parser("eval", help="benchmark a model (arc, piqa, winogrande, boolq, mmlu, gsm8k, ...)",
                       description="Multiple choice by log-likelihood (acc, acc_norm as lm-evaluation-harness) "
                       "and generative tasks by greedy decoding; results cached per model/task/example. "
                       f"Built-in tasks: {', '.join(BUILTIN)} (mmlu:SUBJECT / mmlu_cloze:SUBJECT for one subject).")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF dir or llmkit checkpoint")
    p.add_argument("--adapter", help="PEFT/llmkit adapter directory applied on top of the model")
    p.add_argument("--tasks", default="", help="comma-separated task names")
    p.add_argument("--task-file", action="append", default=[], metavar="FILE.jsonl",
                   help='extra multiple-choice task: one {"query","choices","gold"} a line (repeatable)')
    p.add_argument("--delimiter", default=" ", help="text between query and choice for --task-file (default ' ')")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--shots", type=int, default=None, help="k-shot examples (default: 0; 5 for gsm8k)")
    p.add_argument("--chat", action="store_true", help="put prompts through the model's chat template")
    p.add_argument("--batch-size", type=int, default=32, help="continuations per forward pass (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget for gsm8k")
    p.add_argument("--prompting", default=None, metavar="METHOD",
                   help="gsm8k/svamp through llmkit.apps.prompting (as `llmkit prompt`): zero-shot, few-shot, cot, "
                   "cot-fewshot, sc (self-consistency) or pal; --shots then defaults to the method's")
    p.add_argument("--sc-k", type=int, default=None, help="sampled reasoning paths voted over (sc default 5)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (sc default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--out", default=None, help="write results.json, results.md and samples/*.jsonl here")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--cache", default=None, help="result cache file (default ~/.cache/llmkit/eval/results.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="score everything again, store nothing")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..devices import resolve_device
    from ..errors import LLMKitError
    from ..eval.harness import EvalConfig, default_cache_path, evaluate, solve_config, to_markdown
    from ..eval.tasks import get_task, packaged_data_dir, task_from_file
    from ..io import atomic_dir, check_overwrite

    for name, v, lo in (("--limit", args.limit, 1), ("--shots", args.shots, 0), ("--batch-size", args.batch_size, 1),
                        ("--max-new-tokens", args.max_new_tokens, 1), ("--sc-k", args.sc_k, 1)):
        if v is not None and v < lo:
            raise LLMKitError(f"{name} must be >= {lo}, got {v}")
    device = resolve_device(args.device)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names and not args.task_file:
        raise LLMKitError("no tasks: give --tasks LIST and/or --task-file FILE.jsonl")
    if args.out:
        check_overwrite(args.out, args.force)
    # tasks first: a typo fails before the model loads
    tasks = [get_task(n) for n in names] + [task_from_file(f, args.delimiter) for f in args.task_file]
    cfg = EvalConfig(limit=args.limit, shots=args.shots, chat=args.chat, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, prompting=args.prompting, samples=args.sc_k,
                     temperature=args.temperature, seed=args.seed)
    if args.prompting is None and (args.sc_k is not None or args.temperature is not None):
        raise LLMKitError("--sc-k and --temperature need --prompting (e.g. --prompting sc)")
    if args.prompting is not None:
        solve_config(cfg)  # an unknown method or greedy k > 1 fails before the model loads
        if not any(t.kind == "gen" for t in tasks):
            raise LLMKitError("--prompting applies to generative tasks (gsm8k, svamp); none was given")
    from . import load_model

    torch.set_num_threads(max(1, args.threads))
    model, tok = load_model(args.model, adapter=args.adapter, device=device)
    if tok is None:
        raise LLMKitError(f"{args.model} has no tokenizer")
    cache = None if args.no_cache else (args.cache or default_cache_path())
    report = evaluate(model, tok, tasks, cfg, cache_path=cache, progress=True)
    report = {"model": args.model, **({"adapter": args.adapter} if args.adapter else {}), **report,
              "data": {t.name: t.source for t in tasks}}
    table = to_markdown(report)
    if args.out:
        with atomic_dir(args.out, force=args.force, owns=("results.*", "samples")) as d:
            (d / "results.json").write_text(json.dumps({k: v for k, v in report.items() if k != "samples"},
                                                       indent=2) + "\n")
            (d / "results.md").write_text(table)
            (d / "samples").mkdir()
            for name, recs in report["samples"].items():
                with open(d / "samples" / f"{name.replace(':', '_')}.jsonl", "w") as f:
                    for r in recs:
                        f.write(json.dumps(r) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    else:
        sys.stdout.write(f"model {args.model} (fingerprint {report['fingerprint']}), {report['seconds']} s\n\n{table}")
        packaged = [t.name for t in tasks if t.source.startswith(str(packaged_data_dir()))]
        if packaged:  # scores on a subset are not the published full-set numbers
            print(f"\n{', '.join(packaged)}: the subset packaged with llmkit (llmkit/eval/data/SOURCE.md); "
                  "set LLMKIT_SHARED_DATA to a folder with the full sets")
    return 0
