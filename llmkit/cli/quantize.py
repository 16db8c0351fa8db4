"""`llmkit quantize`: write a quantized llmkit checkpoint (int8, int4 or NF4 weights).

    llmkit quantize --model smollm2-135m-instruct --method int4 --out smollm2-int4
    llmkit generate --model smollm2-int4 --prompt "..."      # loads straight into quantized modules
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    from ..quant import METHODS

    p = sub.add_parser("quantize", help="write a checkpoint with quantized weights (int8, int4, nf4)")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--method", required=True, choices=list(METHODS), help="int8: per-channel absmax; int4: groups "
                   "of 32, asymmetric (Q4_1-like); nf4: QLoRA's 4-bit NormalFloat with double-quantised scales")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import save_checkpoint
    from ..loading import load_model
    from ..quant import quantized_layers

    model, tok = load_model(args.model, quant=args.method)
    layers = quantized_layers(model)
    save_checkpoint(model, args.out, tok, meta={"quantized_from": args.model, "quantization": args.method},
                    force=args.force)
    counts = {m: list(layers.values()).count(m) for m in sorted(set(layers.values()))}
    print(f"wrote {args.out}: {', '.join(f'{n} {m}' for m, n in counts.items())} linear layers", file=sys.stderr)
    return 0
