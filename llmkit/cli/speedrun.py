"""`llmkit speedrun`: tokenizer + tiny LLaMA on tinyshakespeare in a wall-clock budget, with a report."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("speedrun", help="train a tokenizer and a tiny LLaMA on tinyshakespeare in N minutes "
                       "on CPU and write a report", description="Runs with no arguments on embedded defaults: "
                       "10 minutes, 2 threads, output in ./speedrun-<timestamp>/. key=value overrides any field "
                       "of SpeedrunConfig (llmkit/recipes/speedrun.py), e.g. model.n_layer=6 lr=2e-3.")
    p.add_argument("--minutes", type=float, help="total wall-clock budget (default 10)")
    p.add_argument("--out", help="output directory (default ./speedrun-<timestamp>; refuses to overwrite)")
    p.add_argument("--arch", choices=["transformer", "ngram", "rnn", "gru", "lstm"],
                   help="the model: transformer (default) or a classic LM on the same split and tokenizer")
    p.add_argument("--config", help="YAML file of SpeedrunConfig fields")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..recipes.speedrun import SpeedrunConfig, speedrun

    over = list(args.overrides)
    if args.minutes is not None:
        over.append(f"minutes={args.minutes}")
    if args.out:
        over.append(f"out={args.out}")
    if args.arch:
        over.append(f"arch={args.arch}")
    cfg = load_config(SpeedrunConfig, args.config, over)
    r = speedrun(cfg, force=args.force, progress=not args.quiet)
    if cfg.arch != "transformer":
        print(f"{cfg.arch}: held-out bits per byte {r['heldout_bits_per_byte']:.4f} | wall {r['wall_s']:.0f} s | "
              f"{r['params']:,} parameters | {r['tokens_per_s']:,.0f} tokens/s")
        print(f"report: {cfg.out or 'the output directory'}/report.md")
        return 0
    out = r["final_checkpoint"].rsplit("/pretrain/", 1)[0]
    print(f"held-out bits per byte {r['heldout_bits_per_byte']:.4f} | wall {r['wall_s']:.0f} s | "
          f"{r['tokens_per_s']:,.0f} tokens/s | MFU {r['mfu']:.1%} | {r['steps']} steps")
    print(f"report: {out}/report.md  checkpoint: {r['final_checkpoint']}")
    return 0
