"""`llmkit export`: the one export command, to llama.cpp's GGUF, an ollama Modelfile + GGUF, or HF format.

    llmkit export --format gguf --type q8_0 --model runs/speedrun --out speedrun-q8_0.gguf
    llmkit export --format ollama --type q4_1 --model runs/speedrun --out speedrun-ollama   # then:
    ollama create speedrun -f speedrun-ollama/Modelfile
    llmkit export --format hf --model smollm2-135m-instruct --out smollm2-hf
"""

from __future__ import annotations

import sys

FORMATS = ("gguf", "ollama", "hf")


def register(sub) -> None:
    from ..checkpoint.gguf_export import TYPES

    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp), an ollama Modelfile + GGUF, or HF format")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--out", required=True, help="output: a .gguf file (gguf), a directory (ollama, hf)")
    p.add_argument("--format", default="gguf", help=f"one of {', '.join(FORMATS)} (default gguf)")
    p.add_argument("--type", default=None, help=f"GGUF tensor type: {', '.join(TYPES)} (default f16); 1-D "
                   "tensors stay f32; a quantized llmkit model is dequantized first (int4 -> q4_1 keeps its codes)")
    p.add_argument("--name", default=None, help="general.name in the GGUF (default: the --model argument)")
    p.add_argument("--temperature", type=float, default=0.0, help="ollama PARAMETER temperature (default 0: greedy)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint.gguf_export import arch_for, check_type, save_gguf, save_ollama
    from ..errors import LLMKitError, closest
    from ..io import check_overwrite
    import torch

    from . import load_model

    if args.format not in FORMATS:
        raise LLMKitError(f"unknown export format {args.format!r}{closest(args.format, FORMATS)} "
                          f"(known: {', '.join(FORMATS)})")
    if args.format == "hf" and args.type is not None:
        raise LLMKitError("--type applies to --format gguf and ollama (HF format keeps the checkpoint's dtype)")
    qtype = check_type(args.type or "f16")
    check_overwrite(args.out, args.force)  # before loading: a refusal costs nothing
    model, tok = load_model(args.model, dtype=torch.float32)  # exported from the exact weights
    if args.format == "hf":
        return _export_hf(model, tok, args)
    arch_for(model.cfg)
    name = args.name or args.model
    progress = sys.stderr.isatty()
    if args.format == "gguf":
        written = save_gguf(model, tok, args.out, qtype=qtype, force=args.force, name=name, progress=progress)
        kinds = {k: list(written.values()).count(k) for k in sorted(set(written.values()))}
        print(f"wrote {args.out}: {', '.join(f'{n} {k}' for k, n in kinds.items())} tensors", file=sys.stderr)
    else:
        save_ollama(model, tok, args.out, qtype=qtype, force=args.force, name=name, temperature=args.temperature,
                    progress=progress)
        print(f"wrote {args.out}/model.gguf and {args.out}/Modelfile; import with: "
              f"ollama create NAME -f {args.out}/Modelfile", file=sys.stderr)
    return 0


def _export_hf(model, tok, args) -> int:
    from ..checkpoint import save_checkpoint
    from ..errors import LLMKitError
    from ..quant import quantized_layers

    if quantized_layers(model):
        raise LLMKitError(f"{args.model} is quantized: HF tools cannot read llmkit's quantized tensors "
                          "(export --format gguf instead, or export the full-precision model)")
    save_checkpoint(model, args.out, tokenizer=tok, meta={"exported_from": args.model}, force=args.force)
    print(f"wrote {args.out} (config.json + model.safetensors + tokenizer, readable by transformers)", file=sys.stderr)
    return 0
