"""`llmkit distill`: knowledge distillation of a teacher into a student (a preset, a checkpoint, or a
depth-pruned copy of the teacher). Settings come from the DistillConfig defaults <- --config YAML <-
key=value overrides <- the explicit flags."""

from __future__ import annotations


def register(sub) -> None:
    from ..train.dist import DEVICES

    p = sub.add_parser("distill", help="distil a teacher model into a smaller student (Hinton et al. 2015)",
                       description="Knowledge distillation: KL(teacher||student) at temperature tau, times tau^2, mixed "
                       "with the hard-label cross-entropy. Config: YAML with DistillConfig fields "
                       "(llmkit/recipes/distill.py): student/distill sections plus data/optim/train shared with "
                       "finetune; key=value overrides, e.g. distill.temperature=2 distill.alpha=0.9 train.steps=300.")
    p.add_argument("--teacher", help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--student", help="a model preset (fresh weights, the teacher's vocabulary) or a checkpoint with "
                   "the teacher's tokenizer")
    p.add_argument("--student-layers", type=int, metavar="N",
                   help="the student is a copy of the teacher with N of its blocks (student.keep=spread|first)")
    p.add_argument("--data", help="chat JSONL/JSON or plain .txt file(s), comma-separated, each optionally FILE:WEIGHT")
    p.add_argument("--topk-cache", metavar="DIR", help="cache the teacher's top-k logits (distill.topk) in DIR "
                   "and reuse them in later runs over the same data")
    p.add_argument("--config", help="YAML file with DistillConfig fields")
    p.add_argument("--out", help="output directory: the student as an llmkit checkpoint (train.out_dir)")
    p.add_argument("--device", choices=DEVICES, help="auto: CUDA, then MPS, then CPU (train.device; default auto)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue an interrupted run from its latest step checkpoint in OUT.partial")
    p.add_argument("--force", action="store_true", help="overwrite --out (and an interrupted run's OUT.partial)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..recipes.distill import DistillConfig, distill, summary_lines

    over = list(args.overrides)
    for flag, key in (("teacher", "teacher"), ("student", "student.model"), ("student_layers", "student.layers"),
                      ("topk_cache", "distill.topk_cache"), ("out", "train.out_dir"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            over.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(DistillConfig, args.config, over)
    if args.data:
        cfg.data.files = [s for s in args.data.split(",") if s]
    summary = distill(cfg, resume=args.resume, force=args.force)
    for line in summary_lines(summary):
        print(line)
    print(f"wrote {cfg.train.out_dir}")
    return 0
