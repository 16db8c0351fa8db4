"""The quantization trade-off table: size, memory, held-out bits per byte and decode speed per method.

    PYTHONPATH=. python benchmarks/quant_tradeoff.py --model smollm2-135m-instruct \
        --methods fp32,bf16,int8,int4,int4-sym-b32,int4-sym-b64-o16 --gguf smollm2-135m-instruct \
        --llamacpp F32,Q8_0,Q4_0,Q4_K_M --out benchmarks/results/quant/smollm2.jsonl

One row per method, appended to --out as JSON lines:
  bits_per_weight  stored bits per weight of the blocks' linear layers (scales, zero points and kept
                   outlier columns included; embedding and head excluded: llama.cpp's rows count the same)
  file_mb          the weights files on disk (everything: embedding, head, norms)
  peak_rss_mb      the scoring child process's own peak (VmHWM): load + score + decode
  bpb              held-out bits per byte on the first --tokens tokens of tinystories_sample.txt (a text no
                   method calibrated on: outlier-aware methods calibrate on tinyshakespeare), windows of
                   --context tokens every context/2, each token scored by the window giving it the most left
                   context (llmkit.eval.perplexity; llama.cpp rows: the same windows over llama.cpp's logits)
  decode_tok_s     greedy decode of --decode-tokens tokens after a 16-token prompt, --threads threads
llmkit rows are `llmkit quantize` checkpoints (fp32: the unquantized model saved as a checkpoint; bf16: the
same at bf16, run in bf16). llama.cpp rows quantize --gguf with llama-cpp-python's llama_model_quantize
(allow_requantize: the SmolLM2 GGUF llmkit pulls is itself Q4_1, which is also what llmkit's fp32 holds)
and score it with llama.cpp in its own child process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
PROMPT_TOKENS = 16


def run_child(args: list[str]) -> dict:
    """This script as a child (its own memory) -> its JSON line. Not os.wait4's ru_maxrss: Linux carries
    a process's maxrss across fork + exec, so a child of this parent (which has held a whole model) would
    report the parent's peak; the child reports its own address space's high-water mark (VmHWM)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def vm_hwm_mb() -> float:
    """Peak resident set of this process since its exec (VmHWM of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


# ---------------------------------------------------------------- children
def child_llmkit(a) -> dict:
    import torch

    from llmkit.eval.perplexity import perplexity
    from llmkit.inference import SamplingParams, generate
    from llmkit.loading import load_model
    from llmkit.quant import fuse_projections

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model, tok = load_model(a.child, dtype=dtype)
    fuse_projections(model)  # as `llmkit generate` runs it
    text = Path(a.text).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    r = perplexity(model, tok, [text], context=a.context)
    score_s = time.perf_counter() - t0
    g = generate(model, tok.encode(text)[:PROMPT_TOKENS], SamplingParams(max_new_tokens=a.decode_tokens))
    return {"bpb": r["bits_per_byte"], "tokens": r["tokens"], "bytes": r["bytes"], "score_s": round(score_s, 1),
            "decode_tok_s": round((len(g.tokens) - 1) / g.timings["decode_s"], 2)}


def child_llama(a) -> dict:
    import numpy as np

    from llama_cpp import Llama

    from llmkit.llamacpp import no_extra_bufts

    with no_extra_bufts():  # see llmkit.llamacpp.load_llama; logits_all: every position's logits
        llm = Llama(model_path=a.child, n_ctx=a.context, n_threads=a.threads, n_threads_batch=a.threads,
                    logits_all=True, verbose=False)
    text = Path(a.text).read_text(encoding="utf-8")
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n, C = len(ids), a.context
    stride = max(1, C // 2)
    nll, scored = 0.0, 1
    t0 = time.perf_counter()
    for start in range(0, n - 1, stride):  # the windows of llmkit.scoring.token_logprobs
        end = min(start + C, n)
        if end <= scored:
            continue
        llm.reset()
        llm.eval(ids[start:end])
        logits = np.asarray(llm.scores[: end - start], dtype=np.float64)  # (T, V): row i predicts token i+1
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(max(scored, start + 1), end):
            nll -= logp[t - start - 1, ids[t]]
        scored = end
        if end == n:
            break
    score_s = time.perf_counter() - t0
    first = llm.detokenize(ids[:1]).decode("utf-8", "replace")
    n_bytes = len(text.encode("utf-8")) - len(first.encode("utf-8"))
    prompt = ids[:PROMPT_TOKENS]
    llm.reset()
    t0, t_first, out = time.perf_counter(), None, []
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        t_first = t_first or time.perf_counter()
        out.append(t)
        if len(out) >= a.decode_tokens:
            break
    return {"bpb": nll / math.log(2) / n_bytes, "tokens": n - 1, "bytes": n_bytes, "score_s": round(score_s, 1),
            "decode_tok_s": round((len(out) - 1) / (time.perf_counter() - t_first), 2)}


# ---------------------------------------------------------------- parent
def linear_bits(model) -> float:
    """Stored bits per weight of the linear layers inside the blocks (model.layers)."""
    import torch.nn as nn

    from llmkit.quant import QuantLinear

    bits = params = 0
    for m in model.layers.modules():
        if isinstance(m, QuantLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in m.storage().values())
            params += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            bits += m.weight.numel() * m.weight.element_size() * 8
            params += m.weight.numel()
    return bits / params


def gguf_linear_bits(path: Path) -> float:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    ts = [t for t in r.tensors if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name]
    return sum(int(t.n_bytes) for t in ts) * 8 / sum(int(t.n_elements) for t in ts)


def make_checkpoint(model_spec: str, method: str, out: Path, calibration: str | None) -> float:
    """`llmkit quantize` in-process (or the plain model for fp32/bf16) -> bits per weight of its linears."""
    import torch

    from llmkit.checkpoint import save_checkpoint
    from llmkit.loading import load_model
    from llmkit.quant import quantize
    from llmkit.quant.calibrate import calibrate, calibration_text

    model, tok = load_model(model_spec)
    if method == "bf16":
        model.to(torch.bfloat16)
    elif method != "fp32":
        text = calibration_text(calibration)
        quantize(model, method, calibration=lambda: calibrate(model, tok, text))
    bits = linear_bits(model)
    if not out.exists():
        save_checkpoint(model, out, tok, meta={"quantized_from": model_spec, "quantization": method})
    return bits


def table(path: str) -> str:
    """The rows of a results JSONL as the markdown table of BENCHMARKS.md (bpb also relative to fp32)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    ref = {r["model"]: r["bpb"] for r in rows if r["method"] == "fp32"}
    out = ["| engine | method | bits/weight (linears) | file MiB | peak RSS MiB | held-out bpb | vs fp32 | decode tok/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["bpb"] - ref.get(r["model"], r["bpb"])
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "—"  # rows of the first runs: see BENCHMARKS
        out.append(f"| {r['engine']} | {r['method']} | {r['bits_per_weight']:.2f} | {r['file_mb']:.1f} | "
                   f"{rss} | {r['bpb']:.4f} | {d:+.4f} | {r['decode_tok_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", help="print a results JSONL as a markdown table and exit")
    ap.add_argument("--model", help="llmkit --model spec")
    ap.add_argument("--name", help="model name in the rows (default: --model)")
    ap.add_argument("--methods", default="fp32,bf16,int8,int4,nf4", help="comma list: fp32, bf16, llmkit methods")
    ap.add_argument("--gguf", help="an f16/f32 (or requantizable) GGUF of the same model for the llama.cpp rows")
    ap.add_argument("--llamacpp", default="Q8_0,Q4_0,Q4_K_M", help="llama.cpp types to quantize --gguf to")
    ap.add_argument("--text", default=None, help="held-out text (default $LLMKIT_SHARED_DATA/pretrain/"
                    "tinystories_sample.txt)")
    ap.add_argument("--tokens", type=int, default=4096, help="score the first N tokens of it")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", help="calibration text for -o{k} methods (default: tinyshakespeare's start)")
    ap.add_argument("--work", default="/tmp/quant_tradeoff", help="checkpoints and quantized GGUFs go here")
    ap.add_argument("--out", help="JSONL file the rows are appended to")
    # child mode (internal)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="llmkit", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    if a.child:
        r = child_llama(a) if a.engine == "llama.cpp" else child_llmkit(a)
        print(json.dumps({**r, "peak_rss_mb": vm_hwm_mb()}))
        return

    from llmkit.loading import load_model

    name = a.name or a.model
    work = Path(a.work) / Path(name).name
    work.mkdir(parents=True, exist_ok=True)
    src = Path(a.text or Path(os.environ.get("LLMKIT_SHARED_DATA", "/work/shared/data")) / "pretrain"
               / "tinystories_sample.txt")
    _, tok = load_model(a.model)
    ids = tok.encode(src.read_text(encoding="utf-8")[: a.tokens * 8])[: a.tokens]
    slice_path = work / "heldout.txt"
    slice_path.write_text(tok.decode(ids), encoding="utf-8")
    common = ["--text", str(slice_path), "--context", str(a.context), "--decode-tokens", str(a.decode_tokens),
              "--threads", str(a.threads)]
    env = {"cpu": platform.processor() or platform.machine(), "load_avg_start": [round(x, 1) for x in os.getloadavg()],
           "threads": a.threads, "context": a.context, "date": time.strftime("%Y-%m-%d")}
    rows = []

    def emit(row):
        row = {"model": name, **row, **env}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for method in [m for m in a.methods.split(",") if m]:
        ckpt = work / f"ckpt-{method}"
        bits = make_checkpoint(a.model, method, ckpt, a.calibration)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        r = run_child(["--child", str(ckpt), "--dtype", "bfloat16" if method == "bf16" else "float32", *common])
        emit({"engine": "llmkit", "method": method, "bits_per_weight": round(bits, 3),
              "file_mb": round(size / 2**20, 1), **r})
    if a.gguf:
        import llama_cpp

        from llmkit.loading import resolve

        _, gguf = resolve(a.gguf)
        for t in [t for t in a.llamacpp.split(",") if t]:
            out = work / f"llamacpp-{t}.gguf"
            if not out.exists():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if t == 'F32' else 'MOSTLY'}_{t}")
                params.allow_requantize = True
                params.nthread = a.threads
                if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params) != 0:
                    raise SystemExit(f"llama_model_quantize to {t} failed")
            r = run_child(["--child", str(out), "--engine", "llama.cpp", *common])
            emit({"engine": "llama.cpp", "method": t, "bits_per_weight": round(gguf_linear_bits(out), 3),
                  "file_mb": round(out.stat().st_size / 2**20, 1), **r})


if __name__ == "__main__":
    main()
