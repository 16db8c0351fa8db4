"""`llmkit reward --model RM --input F.jsonl [--json]`: score replies with a reward model.

Rows of F (JSONL, a JSON list, .gz too): prompt/response records ({"prompt", "response"}, chat `messages`
ending with the assistant reply, ShareGPT, Alpaca) get one reward; preference rows ({"prompt"|"conversations",
"chosen", "rejected"} or Anthropic HH transcripts) get both sides' rewards, and the summary says how often
the RM prefers the chosen reply. Each conversation is rendered with the RM's chat template exactly as in
training (prompt with the generation prompt, then the reply)."""

from __future__ import annotations

import json
from pathlib import Path

from ..devices import add_device_arg
from ..errors import LLMKitError


def register(sub) -> None:
    p = sub.add_parser("reward", help="score prompt/response pairs (and both sides of preference pairs) with a "
                       "reward model")
    p.add_argument("--model", required=True, help="reward model directory (llmkit align --method rm, or an HF "
                   "*ForSequenceClassification with one label)")
    p.add_argument("--input", required=True, help="JSONL/JSON file of prompt/response or preference rows")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_device_arg(p)
    p.set_defaults(func=run)


def row_sequences(rec: dict, where: str, tok) -> dict[str, list[int]]:
    """One row -> {"reward": ids} for a prompt/response row, {"chosen": ids, "rejected": ids} for a preference row."""
    from ..align.data import to_pair, tokenize_pair
    from ..finetune.data import to_messages

    if "chosen" in rec or "rejected" in rec:
        p, c, r = tokenize_pair(tok, *to_pair(rec, where))
        return {"chosen": p + c, "rejected": p + r}
    msgs = to_messages(rec, where)
    if msgs[-1]["role"] != "assistant":
        raise LLMKitError(f"{where}: the conversation must end with the assistant reply to score")
    p, c, _ = tokenize_pair(tok, msgs[:-1], msgs[-1]["content"], msgs[-1]["content"])
    return {"reward": p + c}


def run(args) -> int:
    import torch

    from ..finetune.data import read_records
    from ..align.reward import load_reward_model, score_batches
    from ..devices import resolve_device

    path = Path(args.input)
    if not path.is_file():
        raise LLMKitError(f"input file not found: {path}")
    if args.batch_size <= 0:
        raise LLMKitError(f"--batch-size must be positive, got {args.batch_size}")
    rm, tok = load_reward_model(args.model)
    if tok is None:
        raise LLMKitError(f"{args.model} has no tokenizer (tokenizer.json) to render the rows with")
    rm.to(resolve_device(args.device))
    rows, seqs = [], []
    for i, rec in read_records(path):
        where = f"{path}:{i}"
        parts = row_sequences(rec, where, tok)
        for side, ids in parts.items():
            if len(ids) > rm.model.max_tokens:
                raise LLMKitError(f"{where}: {side} is {len(ids)} tokens, longer than the reward model's context "
                                  f"of {rm.model.max_tokens}")
        rows.append((i, list(parts)))
        seqs += list(parts.values())
    with torch.inference_mode():
        scores = iter(score_batches(rm, seqs, args.batch_size))
    out, pref = [], []
    for i, sides in rows:
        r = {"row": i, **{side: next(scores) for side in sides}}
        if "chosen" in r:
            r["margin"] = r["chosen"] - r["rejected"]
            pref.append(r["margin"] > 0)
        out.append(r)
    summary = {"rows": len(out), "preference_rows": len(pref),
               "accuracy": sum(pref) / len(pref) if pref else None}
    if args.json:
        print(json.dumps({"model": args.model, "input": str(path), "results": out, "summary": summary}))
        return 0
    for r in out:
        if "reward" in r:
            print(f"row {r['row']:>5}  reward {r['reward']:+.4f}")
        else:
            print(f"row {r['row']:>5}  chosen {r['chosen']:+.4f}  rejected {r['rejected']:+.4f}  "
                  f"margin {r['margin']:+.4f}")
    if pref:
        print(f"prefers the chosen reply in {sum(pref)}/{len(pref)} pairs ({100 * summary['accuracy']:.1f}%)")
    return 0
