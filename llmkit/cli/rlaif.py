"""`llmkit rlaif critique|feedback`: Constitutional AI's two data-making stages (llmkit.align.rlaif).

    llmkit rlaif critique --model M --prompts F [--constitution C.yaml] [--rounds R] --out SFT.jsonl
        the model answers, criticises and revises under sampled principles; SFT.jsonl ({"messages"}) is
        read by `llmkit finetune`, SFT.trace.jsonl keeps every answer, critique, revision and principle
    llmkit rlaif feedback --model M (--prompts F | --pairs F) [--judge J] [--constitution C.yaml] --out P.jsonl
        two answers per prompt (sampled from M, or a preference file's pair), the better one picked by the
        judge's p("A") vs p("B") asked in both orders; P.jsonl is read by `llmkit align --method dpo|rm`
"""

from __future__ import annotations

import json
from pathlib import Path

from ..devices import add_device_arg
from ..errors import LLMKitError


def _common(p, prompts_required: bool = True) -> None:
    p.add_argument("--model", required=True, help="the policy: registry name, GGUF file, HF directory or checkpoint")
    p.add_argument("--adapter", help="adapter directory applied on top of --model")
    if prompts_required:
        p.add_argument("--prompts", required=True, help="JSONL/JSON(.gz) of prompts ({'prompt'}, chat rows, or a "
                       "preference file, whose prompts are used)")
    p.add_argument("--constitution", help="YAML list of principles (id, critique, revision, preference); "
                   "default: llmkit's own (llmkit/align/constitution.yaml)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    p.add_argument("--limit", type=int, help="the first N rows of the input only")
    p.add_argument("--seed", type=int, default=0, help="principle sampling and generation seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated / judged together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer, critique and revision (default 256)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_device_arg(p)


def register(sub) -> None:
    p = sub.add_parser("rlaif", help="Constitutional AI data: self-critique -> revision SFT sets, AI-feedback "
                       "preference sets", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    c = stages.add_parser("critique", help="critique -> revision: an SFT set of the revised answers")
    _common(c)
    c.add_argument("--rounds", type=int, default=1, help="critique/revision rounds per prompt (default 1)")
    c.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7; 0 = greedy)")
    c.add_argument("--trace", help="where the readable trace goes (default: OUT with .trace.jsonl)")
    c.set_defaults(func=run_critique)
    f = stages.add_parser("feedback", help="AI feedback: a preference set judged under the constitution")
    _common(f, prompts_required=False)
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts: two answers are sampled from --model for each")
    src.add_argument("--pairs", help="preference file whose two answers per row are judged (its labels are "
                     "ignored for the output, and compared with the judge's in the summary)")
    f.add_argument("--judge", help="the judge model (default: --model)")
    f.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the two answers "
                   "(default 1.0; must be > 0)")
    f.add_argument("--min-score", type=float, default=0.5, help="keep pairs the judge prefers with at least this "
                   "probability (default 0.5: all)")
    f.set_defaults(func=run_feedback)


def trace_path(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.name[:-len(".jsonl")] + ".trace.jsonl") if p.name.endswith(".jsonl") \
        else p.with_name(p.name + ".trace.jsonl")


def _check(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise LLMKitError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise LLMKitError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise LLMKitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def _write_jsonl(path, rows: list[dict]) -> None:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _generator(model, tok, args, bar):
    from ..align.rlaif import Generator
    from ..inference import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p if args.temperature > 0 else 1.0,
                            max_new_tokens=args.max_new_tokens, stop_ids=tuple(sorted(tok.stop_ids)), seed=args.seed)
    return Generator(model, tok, params, args.batch_size, bar)


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    for k, v in summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items())
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def run_critique(args) -> int:
    import random
    import time

    import torch

    from ..align.constitution import load_constitution
    from ..align.rlaif import critique_revise, read_prompt_rows, sft_record
    from ..io import check_overwrite
    from ..progress import progress_bar
    from .generate import load

    _check(args)
    if args.rounds < 1:
        raise LLMKitError(f"--rounds must be >= 1, got {args.rounds}")
    trace = Path(args.trace) if args.trace else trace_path(args.out)
    if trace.resolve() == Path(args.out).resolve():
        raise LLMKitError("--trace must differ from --out")
    for path in (args.out, trace):
        check_overwrite(path, args.force)
    constitution = load_constitution(args.constitution)
    rows = read_prompt_rows(args.prompts, args.limit)
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args)
    t0 = time.perf_counter()
    with progress_bar(total=len(rows) * (1 + 2 * args.rounds), desc="rlaif critique", unit="gen") as bar:
        traces = critique_revise(_generator(model, tok, args, bar), rows, constitution, args.rounds,
                                 random.Random(args.seed))
    sft = [r for r in (sft_record(row, t) for row, t in zip(rows, traces)) if r is not None]
    if not sft:
        raise LLMKitError(f"no revised answers to write: every prompt was dropped (too long for the context of "
                          f"{model.max_tokens} with --max-new-tokens {args.max_new_tokens}) or left empty")
    _write_jsonl(trace, traces)
    _write_jsonl(args.out, sft)
    changed = sum(t.get("final") is not None and t["final"] != t["initial"] for t in traces)
    _print({"prompts": len(rows), "sft_rows": len(sft), "dropped": sum("dropped" in t for t in traces),
            "revised": changed, "rounds": args.rounds, "principles": len(constitution.principles),
            "wall_s": round(time.perf_counter() - t0, 1), "out": str(args.out), "trace": str(trace)}, args.json)
    return 0


def run_feedback(args) -> int:
    import random
    import time
    from types import SimpleNamespace

    import torch

    from ..align.constitution import load_constitution
    from ..align.rlaif import judge_pairs, label_agreement, preference_record, read_prompt_rows
    from ..io import check_overwrite
    from ..progress import progress_bar
    from .generate import load

    _check(args)
    if not 0 <= args.min_score <= 1:
        raise LLMKitError(f"--min-score must be in [0, 1], got {args.min_score}")
    if args.prompts and args.temperature <= 0:
        raise LLMKitError("--temperature must be > 0 to sample two different answers per prompt")
    check_overwrite(args.out, args.force)
    constitution = load_constitution(args.constitution).for_feedback()
    rows = read_prompt_rows(args.pairs or args.prompts, args.limit)
    if args.pairs:
        unpaired = next((r for r in rows if r.pair is None), None)
        if unpaired is not None:
            raise LLMKitError(f"{unpaired.where}: --pairs needs preference rows (prompt, chosen, rejected); "
                              "give a prompts file with --prompts")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    summary: dict = {"rows": len(rows)}
    model = tok = None
    if args.prompts or not args.judge:
        model, tok = load(args.model, args)
    if args.prompts:
        with progress_bar(total=len(rows), desc="rlaif sample", unit="prompt") as bar:
            answers = _generator(model, tok, args, bar)([r.prompt for r in rows], n=2)
        items = [(r.prompt, a[0], a[1]) for r, a in zip(rows, answers) if a is not None and a[0] != a[1]]
        summary["skipped_identical_or_too_long"] = len(rows) - len(items)
    else:
        items = [(r.prompt, *r.pair) for r in rows]  # a = the labelled-better answer
    if args.judge:
        model, tok = load(args.judge, SimpleNamespace(device=args.device))
    with progress_bar(total=len(items), desc="rlaif judge", unit="pair") as bar:
        judgements = judge_pairs(model, tok, items, constitution, rng, args.batch_size, bar)
    out = [preference_record(p, a, b, j) for (p, a, b), j in zip(items, judgements) if j is not None]
    kept = [r for r in out if r["score"] >= args.min_score]
    if not kept:
        raise LLMKitError(f"no preference rows to write ({len(out)} judged, none with score >= {args.min_score})")
    _write_jsonl(args.out, kept)
    summary.update({"judged": len(out), "written": len(kept),
                    "undecided": sum(abs(r["score"] - 0.5) < 1e-6 for r in out),
                    "mean_score": sum(r["score"] for r in out) / len(out)})
    if args.pairs:
        summary["agreement_with_labels"] = label_agreement(judgements, args.seed)
    summary.update({"wall_s": round(time.perf_counter() - t0, 1), "out": str(args.out)})
    _print(summary, args.json)
    return 0
