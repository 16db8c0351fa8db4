"""`llmkit prune`: write a pruned llmkit checkpoint (magnitude, Wanda, or structured heads / MLP channels / layers).

    llmkit prune --model smollm2-135m-instruct --method wanda --sparsity 0.5 --out smollm2-wanda50
    llmkit prune --model M --method structured --target mlp --sparsity 0.3 --out M-mlp30   # a smaller model
    llmkit score --model smollm2-wanda50 --file held_out.txt                                # loads everywhere

Calibration (wanda, structured): --calibration FILE (UTF-8 text), else the training part of the packaged
tinyshakespeare (never its held-out last 10%); --calib-seqs rows of --calib-len tokens. --recover-steps N
then trains LoRA on the same rows for N steps and merges it (`llmkit.compress.prune.recover`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune weights: magnitude / wanda (unstructured) or structured "
                       "(heads, MLP channels, layers: a smaller model)")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--method", required=True, help="magnitude | wanda | structured")
    p.add_argument("--sparsity", required=True, type=float, help="in [0, 1): fraction of weights zeroed "
                   "(magnitude, wanda) or of the --target's units removed (structured)")
    p.add_argument("--scope", default="layer", help="magnitude: layer (each matrix to the sparsity) or global "
                   "(one threshold over all blocks' linears)")
    p.add_argument("--target", default="mlp", help="structured: mlp (channels), heads (query heads within each "
                   "KV group) or layers (the contiguous run closest in angular distance)")
    p.add_argument("--calibration", help="UTF-8 text file for wanda / structured (default: tinyshakespeare's "
                   "training part, packaged)")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration rows (default 32)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration row (default 256)")
    p.add_argument("--recover-steps", type=int, default=0, help="then a short LoRA fine-tune of this many steps "
                   "on the calibration rows, merged back (unstructured zeros kept; default 0: none)")
    p.add_argument("--recover-lr", type=float, default=1e-3, help="recovery learning rate (AdamW, default 1e-3)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def read_calibration(path: str | None) -> tuple[str, str]:
    """(text, where it came from)."""
    from ..compress.prune import default_calibration_text
    from ..errors import LLMKitError

    if path is None:
        return default_calibration_text(), "tinyshakespeare (training part)"
    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"calibration file not found: {p}")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except UnicodeDecodeError as e:
        raise LLMKitError(f"calibration file {p} is not UTF-8 text (byte {e.start})") from None


def run(args) -> int:
    from ..checkpoint import save_checkpoint
    from ..compress.prune import calibration_ids, check_options, prune, recover
    from ..errors import LLMKitError
    from ..io import check_output_dir
    import torch

    from ..loading import resolve
    from . import load_model

    # every argument checked before the model is loaded or anything is computed
    rec = check_options(args.method, args.sparsity, args.scope, args.target)
    if args.recover_steps < 0:
        raise LLMKitError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    calibrate = rec.needs_calibration or args.recover_steps > 0
    _, model_path = resolve(args.model)
    check_output_dir(args.out, args.force, inputs=[model_path])
    text = where = None
    if calibrate:
        text, where = read_calibration(args.calibration)
        if not text.strip():
            raise LLMKitError(f"calibration file {where} is empty")
    model, tok = load_model(args.model, dtype=torch.float32)  # pruned in full precision
    ids = None
    if calibrate:
        if tok is None:
            raise LLMKitError(f"{args.model} has no tokenizer (tokenizer.json) to encode the calibration text with")
        ids = calibration_ids(tok, text, args.calib_seqs, min(args.calib_len, model.max_tokens), source=where)
    model, report = prune(model, args.method, args.sparsity, ids, scope=args.scope, target=args.target)
    if args.recover_steps:
        report["recovery"] = recover(model, ids, args.recover_steps, lr=args.recover_lr, progress=True)
    meta = {"pruned_from": args.model, "pruning": {**report, **({"calibration": where} if where else {})}}
    save_checkpoint(model, args.out, tok, meta=meta, force=args.force)
    shape = "" if not rec.structured else f", {report['params_after']:,} of {report['params_before']:,} parameters kept"
    print(f"wrote {args.out}: {args.method} {args.sparsity:g}: {report['achieved_sparsity']:.4f} of the blocks' "
          f"linear weights {'removed' if rec.structured else 'zero'}{shape}", file=sys.stderr)
    return 0
