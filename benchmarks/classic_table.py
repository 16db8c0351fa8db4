"""The lectures' story in one table: n-gram -> RNN -> GRU -> LSTM -> transformer on the same split.

    for a in ngram rnn gru lstm transformer; do
        llmkit speedrun --arch $a --out runs/$a threads=1 --quiet
    done
    python benchmarks/classic_table.py runs/*/speedrun.json --out benchmarks/results/classic

Writes table.md (held-out bits per byte, parameters, tokens/s, training tokens), summary.jsonl and
bpb.png (bits per byte by architecture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["ngram", "rnn", "gru", "lstm", "transformer"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="speedrun.json files")
    ap.add_argument("--out", default="benchmarks/results/classic")
    args = ap.parse_args()
    rows = []
    for p in args.runs:
        r = json.loads(Path(p).read_text())
        arch = r.get("arch") or r["config"].get("arch", "transformer")
        rows.append({"arch": arch, "heldout_bits_per_byte": r["heldout_bits_per_byte"], "params": r["params"],
                     "tokens_per_s": r["tokens_per_s"], "tokens": r["tokens"], "train_wall_s": r["train_wall_s"],
                     "wall_s": r["wall_s"], "threads": r["threads"], "order": r.get("order"),
                     "dtype": r.get("dtype", "float32"), "load_average": r.get("load_average")})
    rows.sort(key=lambda r: ORDER.index(r["arch"]) if r["arch"] in ORDER else 99)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| model | held-out bits/byte | parameters | training tokens/s | tokens seen | wall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['arch']} (order {r['order']}, Kneser-Ney)" if r["arch"] == "ngram" else r["arch"]
        what = "n-gram counts" if r["arch"] == "ngram" else ""
        lines.append(f"| {name} | {r['heldout_bits_per_byte']:.3f} | {r['params']:,} {what} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens']:,} | {r['wall_s']:.0f} s |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([r["arch"] for r in rows], [r["heldout_bits_per_byte"] for r in rows], color="#4477aa")
    for i, r in enumerate(rows):
        ax.text(i, r["heldout_bits_per_byte"] + 0.02, f"{r['heldout_bits_per_byte']:.3f}", ha="center", fontsize=8)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("tinyshakespeare, same split and tokenizer, 10 CPU-minutes each")
    ax.set_ylim(0, max(r["heldout_bits_per_byte"] for r in rows) * 1.15)
    fig.tight_layout()
    fig.savefig(out / "bpb.png", dpi=120)


if __name__ == "__main__":
    main()
