"""`llmkit bench finetune`: one fine-tuning step of llmkit (the finetune recipe's own `train_step` and
`sft_loss`) against transformers + peft on the same weights, batch, targets and optimiser, interleaved
in one process (median step time reported).

    llmkit bench finetune --model smollm2-135m-instruct --method lora --compare peft

The transformers model is built from llmkit's own weights (saved in the HF layout to a temporary folder
and read back with `from_pretrained`), so both sides start from identical tensors; peft's LoRA A
matrices are overwritten with llmkit's (B = 0 on both), so the two trainings follow the same curve and
the first-step losses must agree. qlora compares against peft on a bitsandbytes 4-bit NF4 base
(double quantisation, fp32 compute) when bitsandbytes runs on this CPU; full against plain transformers.
`--profile` prints torch.profiler's table of one llmkit step (where the time goes).

Registered by llmkit/cli/bench.py (BENCHES); the leading underscore keeps it out of the top-level
subcommand discovery.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from ..errors import LLMKitError

METHODS = ("lora", "qlora", "full")


def add_finetune(bsub) -> None:
    p = bsub.add_parser("finetune", help="fine-tuning step tokens/s: llmkit vs transformers + peft, same "
                        "weights/batch/targets/optimiser, interleaved")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--compare", default="peft", help="'peft' (transformers + peft; plain transformers for "
                   "full) or '' for llmkit only")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per engine, interleaved; the median is "
                   "reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r, dropout 0)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma list of LoRA targets")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the method's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="autocast dtype of both engines; auto: bfloat16 where this CPU's bf16 matmuls are >= "
                   "1.5x its fp32 ones (the speedrun's probe), else float32")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step of each engine")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_finetune)


def _sections(args):
    from ..peft.lora import LoRAConfig
    from ..recipes.finetune import FinetuneConfig

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return FinetuneConfig(method=args.method, lora=LoRAConfig(r=args.r, alpha=2.0 * args.r, dropout=0.0,
                                                              targets=targets))


def _llmkit_step(model, opt, batch, autocast):
    """The finetune recipe's step: train_step with sft_loss (grad clip 1.0) -> loss."""
    from ..recipes.finetune import sft_loss
    from ..train.loop import train_step

    return train_step(model, opt, [batch], loss_fn=sft_loss, grad_clip=1.0, autocast=autocast)["loss"]


def _hf_step(model, opt, batch, autocast):
    """The usual transformers loop: logits, F.cross_entropy, clip 1.0, AdamW -> loss."""
    import contextlib

    import torch
    import torch.nn.functional as F

    with autocast or contextlib.nullcontext():
        logits = model(input_ids=batch["idx"], use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["targets"].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _peft_model(args, model, hf_dir, skipped):
    """transformers (+ peft) on the weights in hf_dir, with llmkit's LoRA init copied in; None if it cannot run."""
    import torch

    try:
        import transformers
    except ImportError:
        skipped["peft"] = "transformers is not installed (pip install llmkit[test])"
        return None
    kw = {}
    if args.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
        except Exception as e:  # noqa: BLE001  (any reason bitsandbytes will not run here: say it)
            skipped["peft"] = f"bitsandbytes 4-bit does not run here: {type(e).__name__}: {e}"[:300]
            return None
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, device_map="cpu", **kw)
    except Exception as e:  # noqa: BLE001
        if args.method != "qlora":
            raise
        skipped["peft"] = f"transformers + bitsandbytes 4-bit failed to load on CPU: {type(e).__name__}: {e}"[:300]
        return None
    hf.config.use_cache = False
    hf.train()
    if args.method == "full":
        return hf
    try:
        import peft
    except ImportError:
        skipped["peft"] = "peft is not installed (pip install llmkit[test])"
        return None
    from ..peft import get_method

    cfg = peft.LoraConfig(r=args.r, lora_alpha=2.0 * args.r, lora_dropout=0.0, bias="none",
                          target_modules=[t.strip() for t in args.targets.split(",") if t.strip()])
    hf = peft.get_peft_model(hf, cfg)
    ours = get_method(args.method).state(model)  # peft's key names already
    peft.set_peft_model_state_dict(hf, ours)
    mine = {k: v for k, v in peft.get_peft_model_state_dict(hf).items()}
    if mine.keys() != ours.keys() or any(not torch.equal(mine[k], ours[k]) for k in ours):
        raise LLMKitError("could not copy llmkit's LoRA initialisation into the peft model")
    hf.train()
    return hf


def _dequant_times(model, hf, repeat: int = 3) -> dict:
    """Seconds to dequantise every NF4 linear once to fp32 (what a QLoRA step does per linear, forward and
    backward), median of `repeat`: llmkit's QuantLinear.dequantize and bitsandbytes' dequantize_4bit."""
    import torch

    from ..quant import QuantLinear

    def timed(fn):
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    ours = [m for m in model.modules() if isinstance(m, QuantLinear)]
    out = {"llmkit_s": timed(lambda: [m.dequantize(torch.float32) for m in ours]), "linears": len(ours)}
    if hf is not None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF

        theirs = [m for m in hf.modules() if isinstance(m, bnb.nn.Linear4bit)]
        out["bitsandbytes_s"] = timed(lambda: [BF.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                                               for m in theirs])
        out["bitsandbytes_linears"] = len(theirs)
    return out


def _resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    from ..train.mfu import cpu_has_fast_bf16

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def run_finetune(args) -> int:
    import torch

    from ..peft import get_method, trainable_summary
    from ..recipes.common import load_base
    from ..recipes.finetune import apply_method
    from ..train.loop import autocast_context
    from ..train.optim import build_adamw

    for name in ("batch", "seq", "steps", "threads", "r"):
        if getattr(args, name) < 1:
            raise LLMKitError(f"--{name} must be >= 1, got {getattr(args, name)}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    if any(c != "peft" for c in compare):
        raise LLMKitError(f"unknown --compare engine in {args.compare!r} (known: peft)")
    torch.set_num_threads(args.threads)
    dtype = _resolve_dtype(args.dtype)
    autocast = autocast_context(torch.device("cpu"), dtype)
    model, _ = load_base(args.model)
    if args.seq >= model.cfg.max_seq_len:
        raise LLMKitError(f"--seq {args.seq} does not fit the context window of {model.cfg.max_seq_len}")
    torch.manual_seed(0)
    cfg = _sections(args)
    skipped: dict[str, str] = {}
    hf = None
    with tempfile.TemporaryDirectory(prefix="llmkit-bench-ft-") as d:
        if compare:
            from ..checkpoint import save_hf_model

            save_hf_model(model, d)  # the very weights llmkit trains, in the HF layout
        apply_method(model, cfg)
        model.train()
        if compare:
            hf = _peft_model(args, model, d, skipped)
    lr = args.lr if args.lr is not None else get_method(args.method).default_lr
    engines = {"llmkit": (model, build_adamw(model, lr, weight_decay=0.0), _llmkit_step)}
    ref = "transformers" if args.method == "full" else "peft"
    if hf is not None:
        engines[ref] = (hf, build_adamw(hf, lr, weight_decay=0.0), _hf_step)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = {"idx": x[:, :-1], "targets": x[:, 1:]}

    losses = {k: [] for k in engines}
    times = {k: [] for k in engines}
    for i in range(args.steps + 1):  # step 0 is the warm-up (allocator, kernels): its loss counts, its time not
        for name, (m, opt, step) in engines.items():
            t0 = time.perf_counter()
            losses[name].append(float(step(m, opt, batch, autocast)))
            if i:
                times[name].append(time.perf_counter() - t0)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (m, opt, step) in engines.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(m, opt, batch, autocast)
            print(f"{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    tokens = args.batch * args.seq
    dequant = _dequant_times(model, hf) if args.method == "qlora" else None
    res = {k: {"median_step_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
               "losses": losses[k], "trainable": trainable_summary(engines[k][0])["trainable"]}
           for k, v in times.items()}
    info = {"model": args.model, "method": args.method, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "threads": args.threads, "r": args.r, "targets": args.targets, "lr": lr, "dtype": dtype,
            "torch": torch.__version__, "load_avg": list(os.getloadavg()), "results": res, "skipped": skipped,
            **({"dequantize_all_nf4_linears": dequant} if dequant else {})}
    if ref in res:
        info["ratio_llmkit_over_" + ref] = res["llmkit"]["tokens_per_s"] / res[ref]["tokens_per_s"]
        info["first_loss_abs_diff"] = abs(res["llmkit"]["losses"][0] - res[ref]["losses"][0])
    if args.json:
        print(json.dumps(info), flush=True)  # flushed: bitsandbytes' CPU backend can stall the interpreter's exit
        return 0
    print(f"finetune step ({args.method}, fwd+bwd+clip+AdamW lr {lr:g}), batch {args.batch}x{args.seq}, "
          f"{args.threads} threads, {dtype}, median of {args.steps} interleaved steps, "
          f"load avg {info['load_avg'][0]:.2f}")
    for name, r in res.items():
        print(f"{name:<13}{r['tokens_per_s']:>9,.0f} tokens/s  {r['median_step_s'] * 1e3:>8.0f} ms/step  "
              f"trainable {r['trainable']:,}  losses {' '.join(f'{v:.4f}' for v in r['losses'][:4])}")
    if ref in res:
        print(f"llmkit / {ref}: {info['ratio_llmkit_over_' + ref]:.2f}x; first-step losses differ by "
              f"{info['first_loss_abs_diff']:.2e}")
    if dequant:
        print(f"dequantise all {dequant['linears']} NF4 linears to fp32 once: llmkit {dequant['llmkit_s'] * 1e3:.0f} ms"
              + (f", bitsandbytes {dequant['bitsandbytes_s'] * 1e3:.0f} ms" if "bitsandbytes_s" in dequant else ""))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0
