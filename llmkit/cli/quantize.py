"""`llmkit quantize`: write a quantized llmkit checkpoint (post-training quantization of the weights).

    llmkit quantize --model smollm2-135m-instruct --method int4 --out smollm2-int4
    llmkit quantize --model M --method int4-sym --block-size 64 --out DIR       # = int4-sym-b64
    llmkit quantize --model M --method int4-sym-b128-o16 --calibration shakespeare.txt --out DIR
    llmkit generate --model smollm2-int4 --prompt "..."      # loads straight into quantized modules
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    from ..quant.methods import METHODS, SPEC_HELP

    p = sub.add_parser("quantize", help="write a checkpoint with quantized weights (int2..int8, nf4, outlier-aware)")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--method", required=True, help=f"{', '.join(METHODS)} (int8: per-channel absmax with a "
                   "kernel; int4: groups of 32, asymmetric, Q4_1-like, with a kernel; nf4: QLoRA's NormalFloat with "
                   f"double-quantised scales), or {SPEC_HELP}")
    p.add_argument("--block-size", type=int, help="block size for --method int{bits}-sym|asym (32, 64, 128) or "
                   "nf4 (64, 128, 256)")
    p.add_argument("--calibration", help="text file whose activations pick the outlier features of -o{k} methods "
                   "(default: the start of the packaged tinyshakespeare)")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of it to run (default 4096)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import save_checkpoint
    from ..io import check_overwrite
    import torch

    from . import load_model
    from ..quant import quantize, quantized_layers
    from ..quant.calibrate import calibrate, calibration_text
    from ..quant.methods import get_method, with_block_size

    method = get_method(with_block_size(args.method, args.block_size))  # bad names fail before loading
    text = calibration_text(args.calibration)  # an empty or unreadable file fails here, whatever the method
    check_overwrite(args.out, args.force)
    model, tok = load_model(args.model, dtype=torch.float32)  # re-quantized from the exact weights
    quantize(model, method, calibration=lambda: calibrate(model, tok, text, args.calibration_tokens))
    layers = quantized_layers(model)
    save_checkpoint(model, args.out, tok, meta={"quantized_from": args.model, "quantization": method.name},
                    force=args.force)
    counts = {m: list(layers.values()).count(m) for m in sorted(set(layers.values()))}
    print(f"wrote {args.out}: {', '.join(f'{n} {m}' for m, n in counts.items())} linear layers", file=sys.stderr)
    return 0
