"""`llmkit merge`: fold a LoRA adapter into its base model and write a plain llmkit checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into the base weights and save a checkpoint")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter directory (llmkit or HF peft LoRA)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..checkpoint import save_checkpoint
    from ..io import check_overwrite
    from . import load_model
    from ..peft import unload

    check_overwrite(args.out, args.force)
    model, tok = load_model(args.model, adapter=args.adapter, dtype=torch.float32)  # full-precision base, adapter applied
    with torch.no_grad():
        unload(model, merge=True)  # raises for adapters that cannot be folded into weights
    save_checkpoint(model, args.out, tokenizer=tok, meta={"merged_from": {"model": args.model,
                                                                          "adapter": str(args.adapter)}},
                    force=args.force)
    print(f"wrote {args.out} (adapter merged into the weights)")
    return 0
