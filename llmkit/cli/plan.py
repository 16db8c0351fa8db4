"""`llmkit plan`: Chinchilla tokens, training FLOPs, memory per regime, and time, as a table."""

from __future__ import annotations

import math


def _num(s: str) -> float:
    """'135M', '1.5B', '2e9', '300k' -> float."""
    from ..errors import LLMKitError

    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = s.strip().lower().replace("_", "").replace(",", "")
    try:
        x = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise LLMKitError(f"not a number: {s!r} (examples: 135M, 1.5B, 2e9)") from None
    if not math.isfinite(x):
        raise LLMKitError(f"not a finite number: {s!r} (examples: 135M, 1.5B, 2e9)")
    return x


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan a pretraining run: tokens, FLOPs, memory, time")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="parameter count, e.g. 135M or 1.5B")
    src.add_argument("--preset", help="a model preset (see llmkit/models/config.py)")
    p.add_argument("--tokens", help="training tokens (default: Chinchilla, 20 per parameter)")
    p.add_argument("--gpus", type=int, help="devices training in parallel (default 1); off a CUDA machine it "
                   "needs --gpu, --peak-tflops or --tokens-per-s for their speed")
    p.add_argument("--gpu", metavar="NAME", help="a named GPU's datasheet dense bf16 peak: H200, H100, A100, L4, "
                   "RTX 4090, ... (see llmkit/train/mfu.py)")
    p.add_argument("--tokens-per-s", help="measured throughput per device, tokens/s")
    p.add_argument("--peak-tflops", type=float, help="device peak (TFLOP/s) when no throughput is given")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU with --peak-tflops (default 0.4)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..errors import LLMKitError
    from ..train.plan import gpu_peak_flops, make_plan, plan_markdown

    if args.gpu and args.peak_tflops:
        raise LLMKitError("give either --gpu or --peak-tflops, not both")
    active = None
    if args.preset:
        from ..models import ModelConfig
        from ..models.flops import num_params

        cfg = ModelConfig.from_preset(args.preset)
        params, active = num_params(cfg), num_params(cfg, active=True)  # differ for MoE presets
    else:
        params = int(_num(args.params))
    tps = _num(args.tokens_per_s) if args.tokens_per_s else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    source = ""
    if args.gpu:
        peak, name = gpu_peak_flops(args.gpu)
        source = f"{name} datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s at {args.mfu:.0%} MFU"
    if tps is None and peak is None:  # measure this machine: its GPU's peak, or a CPU fp32 matmul rate
        import torch

        from ..train.mfu import device_peak_flops

        if args.gpus is not None and not torch.cuda.is_available():
            # this CPU's rate says nothing about a GPU cluster (it gave 0 tokens/s and 43 million days)
            raise LLMKitError(f"--gpus {args.gpus} needs the GPUs' speed: give --gpu NAME (e.g. H100), "
                              "--peak-tflops or --tokens-per-s")
        peak, source = device_peak_flops("cuda" if torch.cuda.is_available() else "cpu")
        source = f"{source}: {peak / 1e9:.0f} GFLOP/s at {args.mfu:.0%} MFU"
    if not 0 < args.mfu <= 1:
        raise LLMKitError(f"--mfu must be in (0, 1], got {args.mfu}")
    plan = make_plan(params, _num(args.tokens) if args.tokens else None, args.gpus or 1, tps, peak, args.mfu, source,
                     active_params=active)
    if args.json:
        print(json.dumps({"params": plan.params, "active_params": plan.compute_params, "tokens": plan.tokens,
                          "flops": plan.flops, "gpus": plan.gpus, "tokens_per_s": plan.tokens_per_s, "seconds": plan.seconds,
                          "memory_bytes": {k: dict(zip(("weights", "grads", "optimizer", "total"), v))
                                           for k, v in plan.memory.items()}}))
    else:
        print(plan_markdown(plan), end="")
    return 0
