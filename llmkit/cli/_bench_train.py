"""`llmkit bench train`: training throughput of llmkit's Transformer vs transformers' LlamaForCausalLM,
same shape, batch, optimiser and loss, side by side in one process (runs interleaved, median reported).

Registered by llmkit/cli/bench.py (BENCHES); the leading underscore keeps it out of the top-level
subcommand discovery.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from ..devices import add_device_arg
from ..errors import LLMKitError


def add_train(bsub) -> None:
    p = bsub.add_parser("train", help="training tokens/s: llmkit vs transformers LlamaForCausalLM, same shape/batch")
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine, interleaved; the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", default="hf", help="'hf' (transformers) or '' for llmkit only")
    p.add_argument("--compile", action="store_true", help="torch.compile llmkit's model (train.compile=true); "
                   "compile time is excluded, transformers stays eager")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="autocast dtype for both engines (bfloat16: what the speedrun uses on AMX CPUs)")
    p.add_argument("--json", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run_train)


def _step_fn(model, forward, vocab, dtype="float32", device=None):
    """One AdamW step (the optimiser llmkit trains with) on a fixed random batch; returns a closure."""
    import torch

    from ..losses import cross_entropy
    from ..train.loop import autocast_context
    from ..train.optim import build_adamw

    opt = build_adamw(model, 1e-3)

    def step(x):
        with autocast_context(device or torch.device("cpu"), dtype):
            logits = forward(x[:, :-1])
        loss = cross_entropy(logits, x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_train(args) -> int:
    import torch

    from ..devices import resolve_device, synchronize
    from ..models import ModelConfig, Transformer

    for name in ("d_model", "layers", "heads", "d_ff", "vocab", "batch", "seq_len", "steps", "repeat", "threads"):
        if getattr(args, name) <= 0:
            raise LLMKitError(f"--{name.replace('_', '-')} must be positive")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    kv = args.kv_heads or args.heads
    cfg = ModelConfig(family="llama", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_kv_head=kv,
                      d_model=args.d_model, d_ff=args.d_ff, max_seq_len=args.seq_len)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    engines = {"llmkit": _step_fn(ours, torch.compile(ours) if args.compile else ours, args.vocab,
                                  args.dtype, device)}
    skipped = {}
    if "hf" in args.compare.split(","):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            skipped["hf"] = "transformers is not installed"
        else:
            hc = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=kv,
                             max_position_embeddings=args.seq_len, rms_norm_eps=cfg.norm_eps,
                             tie_word_embeddings=False, attention_dropout=0.0)
            hc._attn_implementation = "sdpa"
            hf = LlamaForCausalLM(hc).to(device)
            hf.load_state_dict({k: v for k, v in _hf_names(ours).items()})  # same weights
            engines["hf"] = _step_fn(hf, lambda x: hf(input_ids=x, use_cache=False).logits, args.vocab,
                                     args.dtype, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g).to(device)
    for step in engines.values():  # warm-up (allocator, kernels)
        step(x)
    times = {k: [] for k in engines}
    for _ in range(args.repeat):
        for name, step in engines.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len * args.steps
    res = {k: {"tokens_per_s": tokens / statistics.median(v), "runs_tokens_per_s": [tokens / t for t in v]}
           for k, v in times.items()}
    from ..models.flops import flops_per_token, num_params
    from ..train.mfu import device_peak_flops

    peak, src = device_peak_flops(device, args.dtype)
    fpt = flops_per_token(cfg, args.seq_len)
    for r in res.values():
        r["mfu"] = fpt * r["tokens_per_s"] / peak
    info = {"shape": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "kv_heads": kv,
                      "d_ff": args.d_ff, "vocab": args.vocab, "params": num_params(cfg)},
            "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "repeat": args.repeat,
            "threads": args.threads, "device": str(device), "compile": args.compile, "dtype": args.dtype,
            "load_avg": list(os.getloadavg()), "peak_flops": peak, "peak_source": src,
            "results": res, "skipped": skipped}
    if "hf" in res:
        info["ratio_llmkit_over_hf"] = res["llmkit"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"train step (fwd+bwd+clip+AdamW), {info['shape']['params']:,} params, batch {args.batch}x{args.seq_len}, "
          f"{args.threads} threads, {args.dtype}, median of {args.repeat}x{args.steps} steps, load avg {info['load_avg'][0]:.2f}")
    for name, r in res.items():
        print(f"{name:<8}{r['tokens_per_s']:>10,.0f} tokens/s   MFU {r['mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s")
    if "ratio_llmkit_over_hf" in info:
        print(f"llmkit / transformers: {info['ratio_llmkit_over_hf']:.2f}x")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


def _hf_names(model) -> dict:
    """llmkit state dict under HF LLaMA names (the module names already match, plus the `model.` prefix)."""
    from ..checkpoint.hf import state_dict_to_hf

    return state_dict_to_hf(model)
