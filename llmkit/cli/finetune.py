"""`llmkit finetune`: supervised fine-tuning with any method (full, selective, LoRA, QLoRA, adapters,
prompt tuning, LLaMA-Adapter). Settings come from the FinetuneConfig defaults <- --config YAML <-
key=value overrides <- the explicit flags. Also under `torchrun --nproc_per_node=K -m llmkit finetune ...`."""

from __future__ import annotations


def register(sub) -> None:
    from ..recipes.finetune import METHODS
    from ..train.dist import DEVICES

    p = sub.add_parser("finetune", help="fine-tune a model on instruction/chat data (full or parameter-efficient)",
                       description="Fine-tune. Config: YAML with FinetuneConfig fields (llmkit/recipes/finetune.py): "
                       "sections data/optim/train shared with pretrain, plus lora/qlora/... ; key=value overrides, "
                       "e.g. train.steps=200 optim.lr=1e-4 data.seq_len=1024 lora.r=16. Multi-process: "
                       "torchrun --nproc_per_node=K -m llmkit finetune ... train.strategy=ddp|fsdp.")
    p.add_argument("--model", help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="LoRA adapter merged into --model before fine-tuning (to continue from it)")
    p.add_argument("--data", help="JSONL/JSON file(s), comma-separated, each optionally FILE:WEIGHT (data.files)")
    p.add_argument("--method", choices=METHODS, help="fine-tuning method (default lora)")
    p.add_argument("--task", choices=["sft", "classify"], help="sft (default): a decoder on chat/completion data; "
                   "classify: a BERT encoder + classification head on JSONL {text[, text_pair], label} (method full)")
    p.add_argument("--config", help="YAML file with FinetuneConfig fields")
    p.add_argument("--out", help="output directory (adapter, or a checkpoint for full/selective; train.out_dir)")
    p.add_argument("--device", choices=DEVICES, help="auto: CUDA, then MPS, then CPU (train.device; default auto)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue an interrupted run from its latest step checkpoint in OUT.partial "
                   "(or the given step directory)")
    p.add_argument("--force", action="store_true", help="overwrite --out (and an interrupted run's OUT.partial)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. lora.r=16 train.steps=200")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..recipes.finetune import FinetuneConfig, finetune, summary_lines
    from ..train.dist import cleanup

    over = list(args.overrides)
    if args.adapter:
        over.append(f"base_adapter={args.adapter}")
    for flag, key in (("model", "model"), ("method", "method"), ("out", "train.out_dir"), ("device", "train.device"), ("task", "task")):
        if getattr(args, flag):
            over.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(FinetuneConfig, args.config, over)
    if args.data:
        cfg.data.files = [s for s in args.data.split(",") if s]
    try:
        summary = finetune(cfg, resume=args.resume, force=args.force)
    finally:
        cleanup()
    if summary:  # rank 0
        for line in summary_lines(summary):
            print(line)
        print(f"wrote {cfg.train.out_dir}")
    return 0
