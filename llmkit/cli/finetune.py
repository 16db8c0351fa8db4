"""`llmkit finetune`: supervised fine-tuning with any method (full, selective, LoRA, QLoRA, adapters,
prompt tuning, LLaMA-Adapter). Settings come from the FinetuneConfig defaults <- --config YAML <-
key=value overrides <- the explicit flags."""

from __future__ import annotations


def register(sub) -> None:
    from ..recipes.finetune import METHODS

    p = sub.add_parser("finetune", help="fine-tune a model on instruction/chat data (full or parameter-efficient)")
    p.add_argument("--model", help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="LoRA adapter merged into --model before fine-tuning (to continue from it)")
    p.add_argument("--data", help="JSONL/JSON file(s), comma-separated, each optionally FILE:WEIGHT")
    p.add_argument("--method", choices=METHODS, help="fine-tuning method (default lora)")
    p.add_argument("--config", help="YAML file with FinetuneConfig fields")
    p.add_argument("--out", help="output directory (adapter, or a checkpoint for full/selective)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=16 max_steps=200")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..recipes.finetune import FinetuneConfig, finetune, summary_lines

    over = list(args.overrides)
    if args.adapter:
        over.append(f"base_adapter={args.adapter}")
    for key in ("model", "method", "out"):
        if getattr(args, key):
            over.append(f"{key}={getattr(args, key)}")
    cfg = load_config(FinetuneConfig, args.config, over)
    if args.data:
        cfg.data = [s for s in args.data.split(",") if s]
    elif isinstance(cfg.data, str):
        cfg.data = [cfg.data]
    cfg.force = cfg.force or args.force
    summary = finetune(cfg)
    for line in summary_lines(summary):
        print(line)
    print(f"wrote {cfg.out}")
    return 0
