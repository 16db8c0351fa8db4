"""Held-out bits per byte against sparsity: magnitude vs Wanda (unstructured) vs structured MLP channels.

    OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 10 python benchmarks/prune_curve.py [--models speedrun,smollm2]
        [--sparsities 0,0.1,...] [--out benchmarks/results/prune]

Per model, every point prunes a fresh copy of the dense model with `llmkit.compress.prune.prune` (what
`llmkit prune` runs) and scores the held-out text with `llmkit.eval.perplexity.perplexity`:
  speedrun  /work/models/speedrun/pretrain/final on its held-out last 10% of tinyshakespeare (all of it),
            non-overlapping windows of its 256-token context (`llmkit score` overlaps them by half: 2.0222
            bits/byte dense, with more left context per token)
  smollm2   SmolLM2-135M-Instruct on the first stories of tinystories_sample.txt (a fixed slice of
            --smollm-chars characters cut at a story boundary), non-overlapping windows of 512 tokens
The x axis is the fraction of the blocks' linear weights removed (zeroed, or gone with the pruned
channels). Structured pruning removes MLP channels only, at the channel fraction that matches the asked
sparsity in parameters, f = s · (all block linears) / (MLP linears); a point that would need f >= 1 is
skipped. Calibration for Wanda and the structured scores: --calib-seqs x --calib-len tokens of the
training part of the packaged tinyshakespeare (the CLI's default). Writes <out>/<model>.jsonl (one row a
point), <out>/prune_curve.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from pathlib import Path

import torch

SPEEDRUN = "/work/models/speedrun/pretrain/final"
SPEEDRUN_HELDOUT = "/work/models/speedrun/data/heldout.txt"


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def story_slice(path: Path, chars: int) -> str:
    text = path.read_text(encoding="utf-8")
    cut = text.find("\n\n", chars)
    return text[: cut if cut > 0 else len(text)]


def mlp_share(model) -> float:
    from llmkit.compress.prune import prunable_linears

    ws = prunable_linears(model)
    return sum(m.weight.numel() for n, m in ws.items() if ".mlp." in n) / sum(m.weight.numel() for m in ws.values())


def curve(name: str, model, tok, text: str, sparsities: list[float], ids, context, stride, log) -> list[dict]:
    from llmkit.compress.prune import prune
    from llmkit.eval.perplexity import perplexity

    rows = []
    share = mlp_share(model)

    def point(method: str, s: float, unit: float, **kw):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        m, rep = prune(m, method, unit, ids, **kw)
        t1 = time.perf_counter()
        ppl = perplexity(m, tok, [text], context=context, stride=stride)
        t2 = time.perf_counter()
        row = {"model": name, "method": method + (f"-{kw['target']}" if "target" in kw else ""), "sparsity": s,
               "unit_fraction": unit, "removed_fraction": rep["achieved_sparsity"], "params": rep["params_after"],
               "bits_per_byte": ppl["bits_per_byte"], "perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
               "prune_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
               **{k: rep[k] for k in ("d_ff",) if k in rep}}
        rows.append(row)
        log(f"{name:9} {row['method']:18} s={s:.2f} removed={row['removed_fraction']:.3f} "
            f"bpb={row['bits_per_byte']:.4f} ppl={row['perplexity']:.2f} ({row['prune_s']}s + {row['eval_s']}s)")
        del m

    for s in sparsities:
        if s == 0:
            point("magnitude", 0.0, 0.0)  # the dense model (nothing pruned)
            continue
        point("magnitude", s, s)
        point("wanda", s, s)
        f = s / share
        if f < 1:
            point("structured", s, f, target="mlp")
        else:
            log(f"{name:9} structured-mlp     s={s:.2f}: would need {f:.2f} of the MLP channels, skipped")
    return rows


def plot(all_rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_rows), figsize=(5.5 * len(all_rows), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], all_rows.items()):
        dense = next(r for r in rows if r["sparsity"] == 0)
        for method, style in (("magnitude", "o-"), ("wanda", "s-"), ("structured-mlp", "^-")):
            pts = [dense] + [r for r in rows if r["method"] == method and r["sparsity"] > 0]
            ax.plot([r["removed_fraction"] for r in pts], [r["bits_per_byte"] for r in pts], style, label=method)
        ax.set_title(name)
        ax.set_xlabel("fraction of the blocks' linear weights removed")
        ax.set_ylabel("held-out bits per byte")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="speedrun,smollm2")
    ap.add_argument("--sparsities", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--smollm-sparsities", default="0,0.3,0.5,0.7", help="fewer points: each costs minutes")
    ap.add_argument("--smollm-chars", type=int, default=20000, help="tinystories slice (~5k SmolLM2 tokens)")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/prune")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmkit.compress.prune import calibration_ids, default_calibration_text
    from llmkit.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(os.environ.get("LLMKIT_SHARED_DATA", "/work/shared/data"))
    calib_text = default_calibration_text()
    t_start = time.perf_counter()
    for name in args.models.split(","):
        if name == "speedrun":
            model, tok = load_model(SPEEDRUN)
            text, context, stride = Path(SPEEDRUN_HELDOUT).read_text(encoding="utf-8"), 256, 256
            sparsities = args.sparsities
        elif name == "smollm2":
            model, tok = load_model("smollm2-135m-instruct")
            text, context, stride = story_slice(data / "pretrain/tinystories_sample.txt", args.smollm_chars), 512, 512
            sparsities = args.smollm_sparsities
        else:
            raise SystemExit(f"unknown model {name!r} (speedrun, smollm2)")
        ids = calibration_ids(tok, calib_text, args.calib_seqs, min(args.calib_len, model.max_tokens))
        rows = curve(name, model, tok, text, [float(s) for s in sparsities.split(",")], ids, context, stride,
                     lambda s: print(s, flush=True))
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        del model
    # the plot and tables hold every model's rows in --out (models can be run by separate processes)
    all_rows = {p.stem: [json.loads(ln) for ln in p.read_text().splitlines()] for p in sorted(out.glob("*.jsonl"))}
    plot(all_rows, out / "prune_curve.png")
    print(f"\n{cpu_name()}, {args.threads} thread(s), {time.perf_counter() - t_start:.0f} s in all\n")
    for name, rows in all_rows.items():
        print(f"{name}: held-out bits/byte ({rows[0]['tokens']} tokens)\n")
        print("| sparsity | magnitude | wanda | structured MLP (removed / d_ff) |\n|---:|---:|---:|---:|")
        for s in sorted({r["sparsity"] for r in rows}):
            by = {r["method"]: r for r in rows if r["sparsity"] == s}
            if s == 0:
                d = by["magnitude"]["bits_per_byte"]
                print(f"| 0 (dense) | {d:.4f} | {d:.4f} | {d:.4f} |")
                continue
            st = by.get("structured-mlp")
            st = f"{st['bits_per_byte']:.4f} ({st['removed_fraction']:.3f} / {st['d_ff'][1]})" if st else "n/a"
            print(f"| {s:.1f} | {by['magnitude']['bits_per_byte']:.4f} | {by['wanda']['bits_per_byte']:.4f} | {st} |")
        print()


if __name__ == "__main__":
    main()
