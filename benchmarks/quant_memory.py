"""Peak RSS and wall time of `llmkit generate` on fp32 and quantized SmolLM2-135M-Instruct checkpoints.

    PYTHONPATH=. python benchmarks/quant_memory.py [--work DIR] [--repeat 3] [--max-new-tokens 16] [--prefill]

Each variant runs as its own process (`python -m llmkit generate --model <checkpoint> ...`); its peak
resident set is the child's ru_maxrss from os.wait4, so one run never inherits another's memory.
The fp32 checkpoint is the GGUF converted once (llmkit's cache does the same); the others are made
with `llmkit quantize`. llama-cpp-python, when importable, runs the same GGUF in a child process too.
Prints a markdown table (median of --repeat runs). --prefill then also times what holding no
full-precision copy costs prefill: every (fused) quantized linear of SmolLM2 at 128 rows, dequantized
per call vs a kept bf16 copy (`llmkit.quant.keep_dense_copy`), best of 5 interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "What is the capital of France?"


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Popen + os.wait4 so that the rusage is this child's alone (communicate() would reap it first)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode})")
    return ru.ru_maxrss / 1024, wall, out.strip()


LLAMA_CPP = """
import sys
from llmkit.llamacpp import load_llama  # imports no torch: this child's RSS is llama.cpp's own
llm = load_llama(sys.argv[1], 2, 256)
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=int(sys.argv[3]), temperature=0)
print(out["choices"][0]["message"]["content"])
"""


def prefill_cost(threads: int = 2) -> None:
    import torch
    import torch.nn.functional as F

    from llmkit.loading import load_model
    from llmkit.quant import QuantLinear, fuse_projections

    torch.set_num_threads(threads)
    print("\n| method | 128-row GEMMs, dequantized per call | with a bf16 copy | copy holds |\n|---|---:|---:|---:|")
    for q in ("int8", "int4"):
        m, _ = load_model("smollm2-135m-instruct", quant=q, with_tokenizer=False)
        mods = [mod for mod in fuse_projections(m).modules() if isinstance(mod, QuantLinear)]
        w16 = [mod.dequantize(torch.bfloat16) for mod in mods]
        xs = [torch.randn(128, mod.in_features) for mod in mods]
        per_call, copy = [], []
        with torch.no_grad():
            for _ in range(5):
                t = time.perf_counter()
                for x, mod in zip(xs, mods):
                    mod(x)
                per_call.append(time.perf_counter() - t)
                t = time.perf_counter()
                for x, w in zip(xs, w16):
                    F.linear(x.to(torch.bfloat16), w).float()
                copy.append(time.perf_counter() - t)
        print(f"| {q} | {min(per_call) * 1e3:.0f} ms | {min(copy) * 1e3:.0f} ms | "
              f"{sum(w.numel() * 2 for w in w16) / 2**20:.0f} MiB |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "llmkit" / "bench-quant"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prefill", action="store_true", help="also time prefill GEMMs with and without a bf16 copy")
    args = ap.parse_args()

    # the models are made in child processes: on Linux a child's ru_maxrss starts from its parent's
    # RSS at fork, so this process must stay small for the children's peaks to be their own
    gguf = Path(subprocess.run([sys.executable, "-c", "from llmkit.hub import pull; "
                                "print(pull('smollm2-135m-instruct', quiet=True))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpts = {"fp32": work / "fp32"}
    if not (work / "fp32" / "llmkit.json").exists():
        subprocess.run([sys.executable, "-c", "import sys; from llmkit.loading import load_model; "
                        "from llmkit.checkpoint import save_checkpoint; m, t = load_model(sys.argv[1]); "
                        "save_checkpoint(m, sys.argv[2], t, force=True)", str(gguf), str(work / "fp32")], check=True)
    for m in ("int8", "int4", "nf4"):
        ckpts[m] = work / m
        if not (work / m / "llmkit.json").exists():
            subprocess.run([sys.executable, "-m", "llmkit", "quantize", "--model", str(work / "fp32"),
                            "--method", m, "--out", str(work / m), "--force"], check=True)

    floor = [run_child([sys.executable, "-c", "import torch, llmkit.cli, llmkit.inference"])[0]
             for _ in range(args.repeat)]
    rows = []
    for name, d in ckpts.items():
        cmd = [sys.executable, "-m", "llmkit", "generate", "--model", str(d), "--chat", "--prompt", PROMPT,
               "--max-new-tokens", str(args.max_new_tokens)]
        runs = [run_child(cmd) for _ in range(args.repeat)]
        size = sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20
        rows.append((f"llmkit {name}", size, statistics.median(r[0] for r in runs),
                     statistics.median(r[1] for r in runs), runs[0][2]))
    try:
        import llama_cpp  # noqa: F401

        cmd = [sys.executable, "-c", LLAMA_CPP, str(gguf), PROMPT, str(args.max_new_tokens)]
        runs = [run_child(cmd) for _ in range(args.repeat)]
        rows.append(("llama.cpp (GGUF Q4_1)", gguf.stat().st_size / 2**20, statistics.median(r[0] for r in runs),
                     statistics.median(r[1] for r in runs), runs[0][2]))
        skipped = ""
    except ImportError:
        skipped = "llama-cpp-python is not installed: its row is left out"

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"SmolLM2-135M-Instruct, `llmkit generate --chat --max-new-tokens {args.max_new_tokens}`, "
          f"median of {args.repeat} runs; {cpu}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print(f"python + import torch/llmkit alone: {statistics.median(floor):.0f} MiB\n")
    print("| variant | weights file MiB | peak RSS MiB | RSS / fp32 | wall s | output |")
    print("|---|---:|---:|---:|---:|---|")
    fp32 = rows[0][2]
    for name, size, rss, wall, out in rows:
        print(f"| {name} | {size:.0f} | {rss:.0f} | {rss / fp32:.2f} | {wall:.1f} | {out[:40]!r} |")
    if skipped:
        print(f"\n{skipped}")
    if args.prefill:
        prefill_cost()
    return 0


if __name__ == "__main__":
    sys.exit(main())
