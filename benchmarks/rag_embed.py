"""Embedding throughput: llmkit's MiniLM Embedder vs sentence-transformers on the same CPU and texts.

    OMP_NUM_THREADS=2 nice -n 19 python benchmarks/rag_embed.py --n 128 --repeats 3

Texts: the first N SQuAD context paragraphs (../shared/data/rag). Both run batch 32 in fp32; the runs
alternate and the best of `repeats` counts, since the CPU is shared. Prints one JSON line.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from llmkit.hub import pull
    from llmkit.rag.embeddings import Embedder
    from llmkit.rag.squad import load_squad

    data = Path(os.environ.get("LLMKIT_SHARED_DATA", "../shared/data")) / "rag" / "squad_expmrc_dev.json"
    texts = [d.text for d in load_squad(data)[0][:args.n]]
    d = pull("minilm-l6-v2", quiet=True)
    ours, ref = Embedder(d, batch_size=args.batch_size), SentenceTransformer(str(d), device="cpu")
    best = {"llmkit": float("inf"), "sentence_transformers": float("inf")}
    with torch.inference_mode():
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours.embed(texts)
            best["llmkit"] = min(best["llmkit"], time.perf_counter() - t)
            t = time.perf_counter()
            ref.encode(texts, batch_size=args.batch_size)
            best["sentence_transformers"] = min(best["sentence_transformers"], time.perf_counter() - t)
    tput = {k: len(texts) / v for k, v in best.items()}
    print(json.dumps({"texts": len(texts), "threads": torch.get_num_threads(), "texts_per_s": tput,
                      "ratio_llmkit_over_st": tput["llmkit"] / tput["sentence_transformers"]}))


if __name__ == "__main__":
    main()
