"""`llmkit bench ...`: performance benchmarks, each a sub-subcommand of `bench`.

    llmkit bench decode --model M [--prompt-tokens P] [--new-tokens N] [--compare hf,llama.cpp] [--json]
    llmkit bench serve --model M [--concurrency 1,4,16] [--requests N] [--compare llama.cpp] [--json]
    llmkit bench finetune --model M --method lora|qlora|full [--compare peft] [--batch 4 --seq 256] [--json]

To add a benchmark (e.g. `bench train`), write `add_<name>(bench_subparsers)` that adds its parser
with `set_defaults(func=...)` and append it to BENCHES below.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from ..devices import add_device_arg
from ..errors import LLMKitError


def register(sub) -> None:
    p = sub.add_parser("bench", help="performance benchmarks (decode, ...)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for add in BENCHES:
        add(bsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# ---------------------------------------------------------------- bench decode
def add_decode(bsub) -> None:
    p = bsub.add_parser("decode", help="prefill/decode throughput, time to first token, peak RSS; "
                        "optionally side by side with transformers and llama.cpp")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine, interleaved; the median is reported")
    p.add_argument("--compare", default="", help="comma list of references run on the same workload: hf, llama.cpp "
                   "(on the CPU: compare with --device cpu)")
    p.add_argument("--quant", choices=["int8", "int4", "nf4"], help="llmkit with quantised linears (int8/int4: "
                   "weight-only kernels for decode, dequantised per call to bf16 for prefill; nf4: dequantised per "
                   "call). Default: as `llmkit generate` loads the model (a GGUF's quantized weights stay quantized; "
                   "--dtype float32 for the dequantised weights, the same work as transformers)")
    p.add_argument("--dense-copy", action="store_true", help="with --quant: keep a bf16 copy of each quantized "
                   "weight for prefill (faster prefill, +2 bytes per weight) instead of dequantizing per call")
    p.add_argument("--draft-model", help="comma list of draft models (same vocabulary): llmkit also decodes "
                   "speculatively with each, greedy (output checked identical to plain greedy), side by side")
    p.add_argument("--draft-layers", help="comma list of L: also the target's first L layers as a draft (no copy)")
    p.add_argument("--speculative-k", default="4", help="comma list of draft tokens per step (default 4)")
    p.add_argument("--compile", action="store_true", help="also run llmkit with the compiled decode step "
                   "(engine 'llmkit compiled', torch.compile; its one-off compile time is reported as compile_s)")
    p.add_argument("--batch", default="", help="comma list of N: also decode N prompts together through the "
                   "batched cache (aggregate and per-sequence decode tok/s, scaling over N=1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="llmkit's weights dequantised in this dtype "
                   "(default: a GGUF's quantized weights stay quantized, as `llmkit generate` loads them)")
    p.add_argument("--cold-start", action="store_true", help="instead of warm throughput: time from process start "
                   "to the first generated token and peak RSS of `llmkit generate --max-new-tokens 16` in a fresh "
                   "process, and of llama-cpp-python on the same GGUF, prompt and context length (--repeat runs each)")
    add_device_arg(p)
    p.set_defaults(func=run_decode)


COLD_PROMPT = "Write one sentence about the history of the printing press."
COLD_NEW = 16
# llama-cpp-python in a fresh process: load, then stream the first COLD_NEW tokens to stdout
_LLAMA_CHILD = """import sys
from llama_cpp import Llama
path, n_ctx, threads, prompt, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=True)
for i, t in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
    sys.stdout.write(llm.detokenize([t]).decode(errors="replace") or "?")
    sys.stdout.flush()
    if i + 1 >= n_new:
        break
"""


def _spawn(cmd: list[str], env: dict) -> dict:
    """Run `cmd` fresh: seconds from the spawn to its first byte on stdout (its first generated token,
    streamed), its whole wall time and its peak RSS (os.wait4's rusage of that child alone)."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        first = p.stdout.read(1)
        t_first = time.perf_counter() - t0
        rest = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        if p.returncode or not first:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()
            raise LLMKitError(f"{' '.join(cmd[:4])} ... failed (exit {p.returncode}): {msg[-1] if msg else 'no output'}")
    return {"first_token_s": t_first, "wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024,
            "text": (first + rest).decode(errors="replace")}


def run_cold_start(args) -> int:
    """`bench decode --cold-start`: both engines from process start, interleaved --repeat times."""
    import os

    from ..loading import resolve

    kind, path = resolve(args.model)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    ours = [sys.executable, "-m", "llmkit", "generate", "--model", args.model, "--prompt", COLD_PROMPT,
            "--max-new-tokens", str(COLD_NEW), "--ignore-eos", "--stream", "--device", "cpu",
            *(["--dtype", args.dtype] if args.dtype else []), *(["--quant", args.quant] if args.quant else [])]
    engines = {"llmkit": ours}
    skipped = {}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skipped["llama.cpp"] = "llama-cpp-python is not installed"
    if kind != "gguf":
        skipped["llama.cpp"] = "llama.cpp needs a GGUF model"
    if "llama.cpp" not in skipped:
        # the same context as llmkit's cache: prompt + new tokens (a few spare for BOS / template)
        engines["llama.cpp"] = [sys.executable, "-c", _LLAMA_CHILD, str(path), str(64 + COLD_NEW), str(args.threads),
                                COLD_PROMPT, str(COLD_NEW)]
    runs = {name: [] for name in engines}
    for _ in range(args.repeat):  # interleaved: both see the same machine load
        for name, cmd in engines.items():
            runs[name].append(_spawn(cmd, env))
    results = {name: {k: statistics.median(r[k] for r in rs) for k in ("first_token_s", "wall_s", "peak_rss_mib")}
               for name, rs in runs.items()}
    for name, rs in runs.items():
        results[name]["text"] = rs[0]["text"]
    ratios = {name: {"first_token": results["llmkit"]["first_token_s"] / r["first_token_s"],
                     "peak_rss": results["llmkit"]["peak_rss_mib"] / r["peak_rss_mib"]}
              for name, r in results.items() if name != "llmkit"}
    import platform

    info = {"model": args.model, "cold_start": results, "ratios_llmkit_over": ratios, "threads": args.threads,
            "repeat": args.repeat, "new_tokens": COLD_NEW, "prompt": COLD_PROMPT, "dtype": args.dtype,
            "quant": args.quant, "load_avg": list(os.getloadavg()), "machine": platform.processor() or platform.machine(),
            "skipped": skipped}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"cold start: {args.model}, `generate --max-new-tokens {COLD_NEW}` in a fresh process, {args.threads} threads, "
          f"median of {args.repeat}, load avg {info['load_avg'][0]:.2f}")
    print(f"{'engine':<12}{'first token s':>14}{'wall s':>9}{'peak RSS MiB':>14}")
    for name, r in results.items():
        print(f"{name:<12}{r['first_token_s']:>14.2f}{r['wall_s']:>9.2f}{r['peak_rss_mib']:>14.0f}")
    for name, r in ratios.items():
        print(f"llmkit / {name}: first token {r['first_token']:.2f}x, peak RSS {r['peak_rss']:.2f}x")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
        "faster than scribes. Within fifty years, presses were running in more than two hundred cities across "
        "Europe, and the number of books in circulation rose from thousands to millions. ")


def _workload(tok, vocab: int, n: int) -> list[int]:
    """The same prompt ids for every engine: English prose (a natural next-token distribution, so
    greedy outputs can be compared) or, without a tokenizer, seeded random ids."""
    if tok is not None:
        ids = tok.encode(TEXT * (1 + n // 40))
        if len(ids) >= n:
            return ids[:n]
    import torch

    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _ours(model, prompt, n_new, compiled=False):
    from ..inference import SamplingParams, generate

    g = generate(model, prompt, SamplingParams(max_new_tokens=n_new), compiled=compiled)  # greedy: exactly n_new
    t = g.timings
    return {"ttft_s": t["prefill_s"], "prefill_tok_s": len(prompt) / t["prefill_s"],
            "decode_tok_s": (len(g.tokens) - 1) / t["decode_s"], "tokens": g.tokens}


def _ours_compiled(model, prompt, n_new):
    return _ours(model, prompt, n_new, compiled=True)


def _batch_prompts(tok, vocab: int, n_prompt: int, N: int) -> list[list[int]]:
    """N different prompts of n_prompt tokens each (windows of the same prose at different offsets)."""
    ids = _workload(tok, vocab, n_prompt * 2 + N * 7)
    return [ids[7 * i: 7 * i + n_prompt] if len(ids) >= 7 * i + n_prompt else ids[:n_prompt] for i in range(N)]


def _ours_batch(model, prompts, n_new, compiled=False):
    """N prompts decoded together (generate_batch: one forward per step for all rows) -> aggregate tok/s."""
    from ..inference import SamplingParams, generate_batch

    gs = generate_batch(model, prompts, SamplingParams(max_new_tokens=n_new), compiled=compiled)
    t = gs[0].timings
    new = sum(len(g.tokens) - 1 for g in gs)  # tokens after the first (which the prefill gives)
    return {"decode_tok_s": new / t["decode_s"], "per_seq_tok_s": new / len(gs) / t["decode_s"],
            "prefill_tok_s": t["prompt_tokens"] / t["prefill_s"]}


def _run_batches(args, model, tok, compiled: bool) -> dict:
    """{N: median aggregate/per-sequence decode tok/s over --repeat} for --batch, N interleaved."""
    try:
        Ns = [int(n) for n in args.batch.split(",") if n.strip()]
    except ValueError:
        raise LLMKitError(f"--batch takes a comma list of integers, got {args.batch!r}") from None
    if not Ns or min(Ns) < 1:
        raise LLMKitError(f"--batch values must be >= 1, got {args.batch!r}")
    Ns = sorted(set(Ns) | {1})
    prompts = {N: _batch_prompts(tok, model.cfg.vocab_size, args.prompt_tokens, N) for N in Ns}
    for N in Ns:  # warm-up: allocations (and, compiled, one graph per batch size)
        _ours_batch(model, [p[:16] for p in prompts[N]], 4, compiled)
    runs = {N: [] for N in Ns}
    for _ in range(args.repeat):
        for N in Ns:
            runs[N].append(_ours_batch(model, prompts[N], args.new_tokens, compiled))
    out = {}
    for N in Ns:
        out[N] = {k: statistics.median(r[k] for r in runs[N]) for k in ("decode_tok_s", "per_seq_tok_s",
                                                                       "prefill_tok_s")}
    for N in Ns:
        out[N]["scaling_over_1"] = out[N]["decode_tok_s"] / out[1]["decode_tok_s"]
    return out


def _speculative(draft, k):
    def run(model, prompt, n_new):
        from ..inference import SamplingParams, speculative_generate

        g = speculative_generate(model, draft, prompt, SamplingParams(max_new_tokens=n_new), k=k)
        t = g.timings
        return {"ttft_s": t["prefill_s"], "prefill_tok_s": len(prompt) / t["prefill_s"],
                "decode_tok_s": (len(g.tokens) - 1) / t["decode_s"], "tokens": g.tokens,
                "acceptance_rate": g.stats["acceptance_rate"]}
    return run


def _drafts(args, model, tok) -> dict:
    """{name: draft model} from --draft-model (loaded as the target is) and --draft-layers."""
    from ..inference import truncated_draft
    from ..inference.generate import check_draft
    from .generate import load

    drafts = {}
    for spec in [s for s in (args.draft_model or "").split(",") if s]:
        draft, dtok = load(spec, args, need_tokenizer=False)
        check_draft(model, draft)
        if tok is not None and dtok is not None and dtok.vocab_size != tok.vocab_size:
            raise LLMKitError(f"the draft model {spec} has a different tokenizer from the target's")
        drafts[spec] = draft
    for n in [s for s in (args.draft_layers or "").split(",") if s]:
        if not n.isdigit():
            raise LLMKitError(f"--draft-layers takes a comma list of layer counts, got {args.draft_layers!r}")
        drafts[f"first{n}"] = truncated_draft(model, int(n))
    return drafts


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al. 2023, eq. 1 and thm. 3.8: with per-token acceptance alpha, k drafts per step and a
    draft forward costing c target forwards, decode speed-up (1 − α^(k+1)) / ((1 − α)(k·c + 1))."""
    tokens = (k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + 1)


def _hf_load(path):
    import torch
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return m.eval()


def _hf(model, prompt, n_new):
    import torch

    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        total = time.perf_counter() - t0
    tokens = out[0, len(prompt):].tolist()
    return {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
            "decode_tok_s": (len(tokens) - 1) / max(total - ttft, 1e-9), "tokens": tokens}


def _llama(llm, prompt, n_new):
    llm.reset()
    t0 = time.perf_counter()
    tokens = []
    t_first = None
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(int(t))
        if len(tokens) >= n_new:
            break
    end = time.perf_counter()
    ttft = t_first - t0
    return {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
            "decode_tok_s": (len(tokens) - 1) / max(end - t_first, 1e-9), "tokens": tokens}


def run_decode(args) -> int:
    if getattr(args, "cold_start", False):
        return run_cold_start(args)
    import torch

    from ..loading import resolve
    from .generate import load

    for name in ("prompt_tokens", "new_tokens", "threads", "repeat"):
        if getattr(args, name) < 1:
            raise LLMKitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    bad = [c for c in compare if c not in ("hf", "llama.cpp")]
    if bad:
        raise LLMKitError(f"unknown --compare engine {bad[0]!r} (known: hf, llama.cpp)")
    torch.set_num_threads(args.threads)
    kind, path = resolve(args.model)
    from ..quant import keep_dense_copy

    model, tok = load(args.model, args, need_tokenizer=False)  # fused, quantized with --quant
    keep_dense_copy(model, args.dense_copy)
    prompt = _workload(tok, model.cfg.vocab_size, args.prompt_tokens)
    if args.prompt_tokens + args.new_tokens > model.cfg.max_seq_len:
        raise LLMKitError(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
                          f"context window of {model.cfg.max_seq_len}")
    engines = {"llmkit": (lambda: model, _ours)}
    skipped = {}
    _ours(model, prompt[:16], 4)  # warm-up (allocations, rope tables)
    try:
        ks = [int(k) for k in args.speculative_k.split(",") if k.strip()]
    except ValueError:
        raise LLMKitError(f"--speculative-k takes a comma list of integers, got {args.speculative_k!r}") from None
    if not ks or min(ks) < 1:
        raise LLMKitError(f"--speculative-k values must be >= 1, got {args.speculative_k!r}")
    compile_s = None
    if args.compile:  # the first compiled runs compile (a static and a dynamic cache length): timed apart
        t0 = time.perf_counter()
        _ours_compiled(model, prompt[:16], 4)
        _ours_compiled(model, prompt, args.new_tokens)
        compile_s = time.perf_counter() - t0
        engines["llmkit compiled"] = (lambda: model, _ours_compiled)
    drafts = _drafts(args, model, tok)
    for dname, draft in drafts.items():  # the draft alone (its cost c), then speculative decoding with it
        _ours(draft, prompt[:16], 4)
        engines[f"draft {dname}"] = (lambda d=draft: d, _ours)
        for k in ks:
            engines[f"spec {dname} k={k}"] = (lambda: model, _speculative(draft, k))
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, before references load
    for c in compare:
        if c == "hf":
            try:
                import transformers  # noqa: F401
            except ImportError:
                skipped[c] = "transformers is not installed (pip install llmkit[test])"
                continue
            hf = _hf_load(path)
            _hf(hf, prompt[:16], 4)
            engines["transformers"] = (lambda hf=hf: hf, _hf)
        elif c == "llama.cpp":
            if kind != "gguf":
                skipped[c] = "llama.cpp needs a GGUF model"
                continue
            from ..llamacpp import load_llama

            try:
                llm = load_llama(path, args.threads, args.prompt_tokens + args.new_tokens + 8)
            except ImportError:
                skipped[c] = "llama-cpp-python is not installed"
                continue
            _llama(llm, prompt[:16], 4)
            engines["llama.cpp"] = (lambda llm=llm: llm, _llama)
    runs = {name: [] for name in engines}
    for _ in range(args.repeat):  # interleaved so every engine sees the same machine load
        for name, (get, fn) in engines.items():
            runs[name].append(fn(get(), prompt, args.new_tokens))
    results = {}
    for name, rs in runs.items():
        results[name] = {k: statistics.median(r[k] for r in rs) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")}
        if name != "llmkit":
            a, b = rs[0]["tokens"], runs["llmkit"][0]["tokens"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            results[name]["same_greedy_prefix"] = same
    results["llmkit"]["peak_rss_mib"] = round(rss_ours, 1)
    speculative = {}
    for dname in drafts:
        c = results["llmkit"]["decode_tok_s"] / results[f"draft {dname}"]["decode_tok_s"]  # draft cost / target's
        for k in ks:
            name = f"spec {dname} k={k}"
            rs, r = runs[name], results.pop(name)
            alpha = statistics.median(x["acceptance_rate"] for x in rs)
            speculative[name] = {**r, "draft": dname, "k": k, "acceptance_rate": alpha, "draft_cost_ratio": c,
                                 "speedup": r["decode_tok_s"] / results["llmkit"]["decode_tok_s"],
                                 "expected_speedup": expected_speedup(alpha, k, c),
                                 "identical_to_greedy": all(x["tokens"] == runs["llmkit"][0]["tokens"] for x in rs)}
        del results[f"draft {dname}"]["same_greedy_prefix"]
    ratios = {name: {"decode": results["llmkit"]["decode_tok_s"] / r["decode_tok_s"],
                     "prefill": results["llmkit"]["prefill_tok_s"] / r["prefill_tok_s"]}
              for name, r in results.items() if not name.startswith(("llmkit", "draft "))}
    if "llmkit compiled" in results:
        c = results["llmkit compiled"]
        results["llmkit compiled"]["compile_s"] = compile_s
        ratios.update({f"(compiled) {name}": {"decode": c["decode_tok_s"] / r["decode_tok_s"],
                                             "prefill": c["prefill_tok_s"] / r["prefill_tok_s"]}
                       for name, r in results.items() if not name.startswith(("llmkit", "draft "))})
        ratios["(compiled) llmkit"] = {"decode": c["decode_tok_s"] / results["llmkit"]["decode_tok_s"],
                                       "prefill": c["prefill_tok_s"] / results["llmkit"]["prefill_tok_s"]}
    batches = _run_batches(args, model, tok, args.compile) if args.batch else None
    import os

    info = {"model": args.model, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "threads": args.threads,
            "repeat": args.repeat, "quant": args.quant, "torch": torch.__version__,
            "load_avg": list(os.getloadavg()), "results": results, "ratios_llmkit_over": ratios, "skipped": skipped,
            **({"speculative": speculative} if speculative else {}),
            **({"batch": {str(N): r for N, r in batches.items()}, "batch_compiled": args.compile} if batches else {})}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model {args.model}{' (llmkit ' + args.quant + ')' if args.quant else ''}  prompt {len(prompt)} tok, {args.new_tokens} new tok, greedy, {args.threads} threads, "
          f"median of {args.repeat}, load avg {info['load_avg'][0]:.2f}")
    print(f"{'engine':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT ms':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}{r['ttft_s'] * 1e3:>10.1f}")
    print(f"llmkit peak RSS {rss_ours:.0f} MiB")
    for name, r in ratios.items():
        ref = "llmkit compiled" if name == "(compiled) llmkit" else name.removeprefix("(compiled) ")
        print(f"llmkit / {name}: decode {r['decode']:.2f}x, prefill {r['prefill']:.2f}x "
              f"(same greedy tokens for the first {results[ref]['same_greedy_prefix']})")
    for name, r in speculative.items():
        print(f"{name}: acceptance {r['acceptance_rate']:.3f}, draft cost c {r['draft_cost_ratio']:.3f}, decode "
              f"{r['decode_tok_s']:.1f} tok/s = {r['speedup']:.2f}x plain (expected {r['expected_speedup']:.2f}x), "
              f"{'identical to' if r['identical_to_greedy'] else 'DIFFERS from'} plain greedy")
    if compile_s is not None:
        print(f"llmkit compiled: first runs (compiling) took {compile_s:.1f} s")
    if batches:
        print(f"batched decode ({'compiled' if args.compile else 'eager'}), N prompts together:")
        print(f"{'N':>4}{'aggregate tok/s':>17}{'per sequence':>14}{'x N=1':>8}")
        for N, r in batches.items():
            print(f"{N:>4}{r['decode_tok_s']:>17.1f}{r['per_seq_tok_s']:>14.1f}{r['scaling_over_1']:>8.2f}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- bench serve
def add_serve(bsub) -> None:
    p = bsub.add_parser("serve", help="load test of `llmkit serve` (continuous batching) on loopback: output "
                        "tok/s, req/s, TTFT and inter-token latency; optionally against llama-cpp-python's server")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (greedy)")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads of the server (default 2)")
    p.add_argument("--compare", default="", help="llama.cpp: the same workload against llama-cpp-python's OpenAI "
                   "server on the same GGUF and threads")
    p.add_argument("--quant", default="int4", choices=["none", "int8", "int4", "nf4"],
                   help="llmkit serve --quant (default int4: for a GGUF Q4_1 model, its own group-32 layout, the "
                   "weights llama.cpp serves; none: fp32)")
    p.add_argument("--dense-copy", action=argparse.BooleanOptionalAction, default=True,
                   help="llmkit serve --dense-copy: bf16 weights for many-row forwards (default on)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="llmkit serve --prefill-chunk (default 256)")
    p.add_argument("--prefix-cache", default="0", help="comma list of llmkit serve --prefix-cache N values: one "
                   "llmkit server each, side by side (e.g. 0,8: without and with prefix caching)")
    p.add_argument("--system-prompt-words", type=int, default=0, metavar="N",
                   help="every request starts with the same system message of N words (~1.2 tokens each)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_serve)


def _start(cmd: list[str], url: str, timeout: float = 900):
    """Start a server process and wait until it answers."""
    import subprocess
    import tempfile
    import urllib.request

    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty server would block once it is full
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return proc
        except Exception:
            if proc.poll() is not None:
                log.seek(0)
                raise LLMKitError(f"the server {cmd[2]} exited: {log.read().strip()[-300:]}")
            if time.time() - t0 > timeout:
                proc.kill()
                raise LLMKitError(f"the server {cmd[2]} did not answer within {timeout:.0f} s")
            time.sleep(0.5)


def _stop(proc):
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_serve(args) -> int:
    import os
    import socket

    from ..loading import resolve
    from ..serve.load import run_load

    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise LLMKitError(f"--concurrency takes a comma list of integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise LLMKitError(f"--concurrency levels must be >= 1, got {args.concurrency!r}")
    for name in ("requests", "max_tokens", "threads", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise LLMKitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    if any(c != "llama.cpp" for c in compare):
        raise LLMKitError(f"unknown --compare engine in {args.compare!r} (known: llama.cpp)")
    kind, path = resolve(args.model)
    if compare and kind != "gguf":
        raise LLMKitError("--compare llama.cpp needs a GGUF model")

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    try:
        prefix = [int(c) for c in args.prefix_cache.split(",") if c.strip()]
    except ValueError:
        raise LLMKitError(f"--prefix-cache takes a comma list of integers, got {args.prefix_cache!r}") from None
    if not prefix or min(prefix) < 0 or args.system_prompt_words < 0:
        raise LLMKitError("--prefix-cache values and --system-prompt-words must be >= 0")
    from ..serve.load import system_prompt

    system = system_prompt(args.system_prompt_words) if args.system_prompt_words else None

    def ours(n_prefix: int):
        return lambda p: ([sys.executable, "-m", "llmkit", "serve", "--model", args.model, "--name", "bench",
                           "--port", str(p), "--max-batch", str(max(levels)), "--max-queue", str(args.requests),
                           "--threads", str(args.threads), "--max-len", "1024", "--prefill-chunk",
                           str(args.prefill_chunk), "--prefix-cache", str(n_prefix),
                           "--dense-copy" if args.dense_copy else "--no-dense-copy"]
                          + ([] if args.quant == "none" else ["--quant", args.quant]))

    servers = {("llmkit" if i == 0 else f"llmkit prefix-cache {n}"): ours(n) for i, n in enumerate(prefix)}
    if "llama.cpp" in compare:
        servers["llama.cpp"] = lambda p: [sys.executable, "-c", "from llmkit.llamacpp import serve; serve()",
                                          "--model", str(path), "--model_alias", "bench", "--host", "127.0.0.1",
                                          "--port", str(p), "--n_threads", str(args.threads), "--n_threads_batch",
                                          str(args.threads), "--n_ctx", "2048", "--verbose", "False",
                                          "--interrupt_requests", "False"]  # queue, do not cut, concurrent requests
    results: dict[str, list[dict]] = {}
    for name, cmd in servers.items():
        p = port()
        url = f"http://127.0.0.1:{p}"
        proc = _start(cmd(p), url)
        try:
            run_load(url, "bench", 1, 2, 4, system=system)  # warm-up (a prefix cache now holds the system prompt)
            results[name] = []
            for c in levels:
                r = run_load(url, "bench", c, args.requests, args.max_tokens, system=system)
                results[name].append(r)
                print(f"{name} c={c}: {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s, wall "
                      f"{r['wall_s']:.1f} s", file=sys.stderr, flush=True)  # partial results survive a kill
        finally:
            _stop(proc)
    base = {r["concurrency"]: r for r in results["llmkit"]}
    ref = list(base[min(levels)]["texts"])
    for name, rs in results.items():  # greedy answers: do they match llmkit's one-at-a-time answers?
        for r in rs:
            r["same_text_as_llmkit_c%d" % min(levels)] = sum(a == b for a, b in zip(r.pop("texts"), ref))
    one = base[min(levels)]["output_tok_s"]
    ratios = {f"llmkit c={c} / llmkit c={min(levels)}": base[c]["output_tok_s"] / one for c in levels}
    for name, rs in results.items():
        if name != "llmkit":
            for r in rs:
                ratios[f"llmkit / {name} at c={r['concurrency']}"] = base[r["concurrency"]]["output_tok_s"] / r["output_tok_s"]
    info = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens, "threads": args.threads,
            "quant": args.quant, "dense_copy": args.dense_copy, "prefill_chunk": args.prefill_chunk,
            "system_prompt_words": args.system_prompt_words,
            "load_avg": list(os.getloadavg()), "results": results, "ratios": ratios}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model {args.model}  {args.requests} requests per level, max_tokens {args.max_tokens}, greedy, "
          f"{args.threads} threads, llmkit --quant {args.quant}{' --dense-copy' if args.dense_copy else ''}, "
          f"system prompt {args.system_prompt_words} words, load avg {info['load_avg'][0]:.2f}")
    print(f"{'engine':<24}{'conc':>5}{'tok/s':>8}{'req/s':>7}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}"
          f"{'wall':>7}{'errors':>7}{'incompl':>8}{'same':>6}")
    for name, rs in results.items():
        for r in rs:
            same = r["same_text_as_llmkit_c%d" % min(levels)]
            print(f"{name:<24}{r['concurrency']:>5}{r['output_tok_s']:>8.1f}{r['req_s']:>7.2f}"
                  f"{r['ttft_p50_s'] * 1e3:>8.0f}ms{r['ttft_p99_s'] * 1e3:>6.0f}ms{r['itl_p50_s'] * 1e3:>7.0f}ms"
                  f"{r['itl_p99_s'] * 1e3:>6.0f}ms{r['wall_s']:>6.1f}s{r['errors']:>7}{r['incomplete']:>8}{same:>6}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    return 0


# one entry per `llmkit bench <name>`; add yours here (e.g. add_train from the pretraining code)
from ._bench_finetune import add_finetune  # noqa: E402  (fine-tuning vs peft: `llmkit bench finetune`)
from ._bench_train import add_train  # noqa: E402  (pretraining: `llmkit bench train`)

BENCHES = [add_decode, add_train, add_serve, add_finetune]
