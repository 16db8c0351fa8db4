"""`llmkit align --method rm|dpo|ipo|ppo|grpo --model M --data F --out DIR [key=value ...]`: the alignment
recipes. Each method is one entry of RECIPES; settings come from the recipe config's defaults <- --config
YAML <- key=value overrides <- the explicit flags."""

from __future__ import annotations

import importlib

# method -> (recipe module, config class, run function); the module also has summary_lines(summary).
# Imported only when that method runs.
RECIPES = {
    "grpo": ("llmkit.recipes.grpo", "GRPOConfig", "grpo"),
    "ppo": ("llmkit.recipes.ppo", "PPOConfig", "ppo"),
}


def register(sub) -> None:
    from ..devices import DEVICES

    p = sub.add_parser("align", help="align a model: reward model, DPO/IPO, PPO, GRPO",
                       description="Alignment recipes. key=value overrides set config fields, e.g. train.steps=30 "
                       "grpo.group_size=8 optim.lr=1e-5 (see llmkit/recipes/<method>.py).")
    p.add_argument("--method", required=True, choices=sorted(RECIPES), help="the alignment method")
    p.add_argument("--model", help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--data", help="data file(s), comma-separated (grpo: prompt JSONL or toy-arithmetic)")
    p.add_argument("--reward-model", help="reward model directory (ppo)")
    p.add_argument("--config", help="YAML file with the recipe config's fields")
    p.add_argument("--out", help="output directory (train.out_dir)")
    p.add_argument("--device", choices=DEVICES, help="auto: CUDA, then MPS, then CPU (train.device)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config

    module_name, config_name, run_name = RECIPES[args.method]
    module = importlib.import_module(module_name)
    over = list(args.overrides)
    for flag, key in (("model", "model"), ("out", "train.out_dir"), ("device", "train.device"),
                      ("reward_model", "reward_model")):
        if getattr(args, flag, None):
            over.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(getattr(module, config_name), args.config, over)
    if args.data:
        cfg.data.files = [s for s in args.data.split(",") if s]
    summary = getattr(module, run_name)(cfg, force=args.force)
    for line in module.summary_lines(summary):
        print(line)
    print(f"wrote {cfg.train.out_dir}")
    return 0
