"""`llmkit judge`: an LLM judges a jsonl file (G-Eval scores or pairwise A vs B)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("judge", help="LLM as a judge: G-Eval scores of summaries, or pairwise A vs B",
                       description="geval: one {source, summary} object a line (field names set by --source-field "
                       "and --summary-field), scored per criterion as Σ p(s)·s. pairwise: {question, a, b} a "
                       "line, asked in both orders.")
    p.add_argument("--model", required=True, help="the judge: registry name, GGUF file, HF dir or checkpoint")
    p.add_argument("--input", required=True, help="jsonl file")
    p.add_argument("--mode", choices=["geval", "pairwise"], default="geval")
    p.add_argument("--criteria", default="coherence,consistency,fluency,relevance", help="geval criteria")
    p.add_argument("--source-field", default="dialogue", help="geval: field with the source text")
    p.add_argument("--summary-field", default="summary", help="geval: field with the summary to score")
    p.add_argument("--question-field", default="question", help="pairwise: field with the question")
    p.add_argument("--a-field", default="a", help="pairwise: field with response A")
    p.add_argument("--b-field", default="b", help="pairwise: field with response B")
    p.add_argument("--limit", type=int, default=None, help="first N lines")
    p.add_argument("--chat", action="store_true", help="put prompts through the chat template")
    p.add_argument("--out", default=None, help="write per-line results here (jsonl)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _read(path: str, fields: list[str], limit: int | None) -> list[dict]:
    from ..errors import LLMKitError
    from ..eval.tasks import read_jsonl

    rows = read_jsonl(Path(path))[:limit] if limit else read_jsonl(Path(path))
    for row in rows:
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise LLMKitError(f"{path}: line {row['_line']} has no text field {missing[0]!r}")
    if not rows:
        raise LLMKitError(f"{path} has no examples")
    return rows


def run(args) -> int:
    import torch

    from ..errors import LLMKitError, closest
    from ..eval.harness import mean_stderr
    from ..eval.judge import CRITERIA, Judge
    from ..io import atomic_path, check_overwrite
    from ..progress import progress_bar

    if args.limit is not None and args.limit < 1:
        raise LLMKitError(f"--limit must be >= 1, got {args.limit}")
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    for c in criteria:
        if c not in CRITERIA:
            raise LLMKitError(f"unknown criterion {c!r}{closest(c, CRITERIA)}; known: {', '.join(CRITERIA)}")
    fields = [args.source_field, args.summary_field] if args.mode == "geval" else \
        [args.question_field, args.a_field, args.b_field]
    rows = _read(args.input, fields, args.limit)
    if args.out:
        check_overwrite(args.out, args.force)
    torch.set_num_threads(2)
    from . import load_model

    model, tok = load_model(args.model)
    judge = Judge(model, tok, chat=args.chat)
    results = []
    if args.mode == "geval":
        steps = {c: judge.evaluation_steps(c) for c in criteria}
        for row in progress_bar(iterable=rows, desc="judge", unit="ex", file=sys.stderr):
            r = {c: judge.geval(c, row[args.source_field], row[args.summary_field], steps[c]) for c in criteria}
            results.append({c: v["score"] for c, v in r.items()} | {"detail": r})
        summary = {"n": len(rows), "steps": steps}
        for c in criteria:
            m, se = mean_stderr([r[c] for r in results])
            summary[c], summary[f"{c}_stderr"] = m, se
    else:
        for row in progress_bar(iterable=rows, desc="judge", unit="pair", file=sys.stderr):
            results.append(judge.pairwise(row[args.question_field], row[args.a_field], row[args.b_field]))
        wins = [r["winner"] for r in results]
        summary = {"n": len(rows), "a_wins": wins.count("A"), "b_wins": wins.count("B"), "ties": wins.count("tie"),
                   "mean_p_a": sum(r["p_a"] for r in results) / len(results),
                   "consistent": sum(r["consistent"] for r in results) / len(results)}
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            if k == "steps":
                continue
            print(f"{k}\t{v:.4f}" if isinstance(v, float) else f"{k}\t{v}")
    return 0
