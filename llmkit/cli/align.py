"""`llmkit align --method rm|dpo|ipo|ppo|grpo`: the alignment recipes behind one command. Settings come
from the recipe's config defaults <- --config YAML <- key=value overrides <- the explicit flags.

RECIPES is the table of methods: each is one `AlignRecipe` entry naming its recipe module, config
class and run function, plus the config keys the method implies (ipo: loss_type=ipo) and where the
common flags go in its config. A new method adds one entry.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AlignRecipe:
    module: str  # llmkit.recipes.<name>, imported only when the method runs
    config: str  # its config dataclass
    run: str  # run(cfg, resume=..., force=...) -> summary dict; the module may define summary_lines(summary)
    help: str
    preset: tuple[str, ...] = ()  # key=value the method implies, applied before the user's overrides
    # flag -> config key; a flag the method has no key for is an error
    keys: dict = field(default_factory=lambda: {"model": "model", "out": "train.out_dir", "device": "train.device"})


RECIPES: dict[str, AlignRecipe] = {
    "dpo": AlignRecipe("llmkit.recipes.dpo", "DPOConfig", "train_dpo", "Direct Preference Optimization",
                       preset=("loss_type=dpo",)),
    "ipo": AlignRecipe("llmkit.recipes.dpo", "DPOConfig", "train_dpo", "Identity Preference Optimisation",
                       preset=("loss_type=ipo",)),
    "rm": AlignRecipe("llmkit.recipes.reward", "RewardConfig", "train_reward",
                      "reward model (InstructGPT: scalar head, Bradley-Terry loss)"),
    "grpo": AlignRecipe("llmkit.recipes.grpo", "GRPOConfig", "grpo",
                        "GRPO (DeepSeekMath: group-normalised rewards, clipped ratio, k3 KL; no value model)"),
    "ppo": AlignRecipe("llmkit.recipes.ppo", "PPOConfig", "ppo",
                       "PPO for RLHF (value head, per-token KL penalty, GAE, clipped surrogate)"),
}


def register(sub) -> None:
    from ..train.dist import DEVICES

    p = sub.add_parser("align", help="align a model: reward model, DPO/IPO, PPO, GRPO",
                       description="Alignment recipes: " + "; ".join(f"{k}: {r.help}" for k, r in RECIPES.items())
                       + ". key=value overrides set the recipe's config fields (e.g. beta=0.1 train.steps=200 "
                       "optim.lr=5e-5 lora.r=16).")
    p.add_argument("--method", required=True, choices=sorted(RECIPES), help="the alignment method")
    p.add_argument("--model", help="the model to align: registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--data", help="data file(s), comma-separated (data.files)")
    p.add_argument("--reward-model", help="reward model directory (llmkit align --method rm) to score completions with (ppo, grpo: reward rm)")
    p.add_argument("--config", help="YAML file with the recipe's config fields")
    p.add_argument("--out", help="output directory (adapter, or a checkpoint for full weights)")
    p.add_argument("--device", choices=DEVICES, help="auto: CUDA, then MPS, then CPU (train.device)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue an interrupted run from its latest step checkpoint in OUT.partial")
    p.add_argument("--force", action="store_true", help="overwrite --out (and an interrupted run's OUT.partial)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. beta=0.1 train.steps=200")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..errors import LLMKitError
    from ..train.dist import cleanup

    recipe = RECIPES[args.method]
    module = importlib.import_module(recipe.module)
    config_cls, run_fn = getattr(module, recipe.config), getattr(module, recipe.run)
    keys = {"reward_model": "reward_model", **recipe.keys}
    over = list(recipe.preset) + list(args.overrides)
    top = {f.name for f in dataclasses.fields(config_cls)}
    for flag in ("model", "out", "device", "reward_model"):
        value = getattr(args, flag)
        if value:
            key = keys.get(flag)
            if key is None or key.split(".")[0] not in top:
                raise LLMKitError(f"--{flag.replace('_', '-')} is not used by --method {args.method}")
            over.append(f"{key}={value}")
    cfg = load_config(config_cls, args.config, over)
    if args.data:
        if "data" not in top:
            raise LLMKitError(f"--data is not used by --method {args.method}")
        cfg.data.files = [s for s in args.data.split(",") if s]
    try:
        summary = run_fn(cfg, force=args.force, resume=args.resume)  # every recipe writes step checkpoints
    finally:
        cleanup()
    if summary:  # rank 0
        for line in getattr(module, "summary_lines", lambda s: [])(summary):
            print(line)
        print(f"wrote {cfg.train.out_dir}")
    return 0
