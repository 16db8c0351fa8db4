"""`llmkit pretrain --config FILE.yaml [key=value ...]`: train a model from scratch (also under torchrun)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model from scratch on prepared token shards",
                       description="Pretrain from scratch. Config: YAML with preset, model (field overrides) "
                       "and the sections data/optim/train shared with finetune (llmkit/recipes/pretrain.py, "
                       "llmkit/recipes/config.py); key=value overrides, e.g. optim.lr=1e-3 "
                       "train.steps=500. Multi-process: torchrun --nproc_per_node=K -m llmkit pretrain ... "
                       "train.strategy=ddp|fsdp.")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from the latest checkpoint in train.out_dir (or the given step directory)")
    p.add_argument("--force", action="store_true", help="overwrite an existing train.out_dir")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..recipes.pretrain import PretrainConfig, pretrain
    from ..train.dist import cleanup

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    try:
        s = pretrain(cfg, resume=args.resume, force=args.force)
    finally:
        cleanup()
    if s:
        val = f", val loss {s['val_loss']:.4f}" if "val_loss" in s else ""
        val += f", {s['val_bpb']:.4f} bits/byte" if "val_bpb" in s else ""
        val += f", masked-token accuracy {s['val_mlm_accuracy']:.1%}" if "val_mlm_accuracy" in s else ""
        print(f"done: {s['steps']} steps, loss {s['final_loss']:.4f}{val}, {s['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {s['mfu']:.1%}; checkpoint {s['final_checkpoint']}")
    return 0
