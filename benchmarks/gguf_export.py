"""The speedrun model exported to GGUF and run in llama.cpp: same greedy tokens, log-prob gap per type.

    PYTHONPATH=. python benchmarks/gguf_export.py [--model /work/models/speedrun/pretrain/final]
        [--types f32,f16,q8_0,q4_1,q4_0] [--tokens 32] [--heldout FILE --score-tokens 255]

For each type: `save_gguf` (what `llmkit export --format gguf --type T` does), then
  * llama.cpp (llama-cpp-python) tokenizes each prompt as llmkit does (ids equal);
  * greedy continuations of --tokens tokens from llama.cpp and from llmkit reading the same GGUF back:
    how many prompts agree on every token;
  * on --score-tokens tokens of held-out text: max |log p| gap per position between llama.cpp and llmkit
    on the same file, and the mean NLL (nats/token) of llama.cpp, of the GGUF read back by llmkit and
    of the original fp32 llmkit model (the type's own error).
Prints a markdown table; one thread each (OMP_NUM_THREADS=1, llama.cpp n_threads=1).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["ROMEO:", "First Citizen:\nWe are accounted poor", "KING RICHARD III:\nNow is the", "To be, or not",
           "JULIET:\nO Romeo, Romeo", "MENENIUS:\nWhat work's, my countrymen"]


def cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/models/speedrun/pretrain/final")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_1,q4_0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--heldout", default="/work/models/speedrun/data/heldout.txt")
    ap.add_argument("--score-tokens", type=int, default=255)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from llmkit.checkpoint import load_gguf
    from llmkit.checkpoint.gguf_export import save_gguf
    from llmkit.inference import generate
    from llmkit.inference.sampling import SamplingParams
    from llmkit.llamacpp import load_llama
    from llmkit.loading import load_model

    model, tok = load_model(args.model)
    text = Path(args.heldout).read_text()[:4000]
    ids = tok.encode(text)[: args.score_tokens + 1]
    x = torch.tensor([ids])

    def nll(logp: torch.Tensor) -> float:  # logp (T, V) -> mean NLL of the next tokens
        return -logp[:-1].gather(1, x[0, 1:, None]).mean().item()

    with torch.no_grad():
        ref = torch.log_softmax(model(x)[0].float(), -1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for qtype in args.types.split(","):
            out = Path(d) / f"m-{qtype}.gguf"
            t0 = time.perf_counter()
            save_gguf(model, tok, out, qtype)
            secs = time.perf_counter() - t0
            back, _ = load_gguf(out)
            llm = load_llama(out, 1, max(512, len(ids) + 8), logits_all=True)
            tok_ok = all(llm.tokenize(p.encode(), add_bos=False, special=True) == tok.encode(p) for p in PROMPTS)
            same = 0
            for p in PROMPTS:
                pid = tok.encode(p)
                want = generate(back, pid, SamplingParams(temperature=0, max_new_tokens=args.tokens)).tokens
                same += cpp_greedy(llm, pid, args.tokens) == want
            llm.reset()
            llm.eval(ids)
            cpp = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)])), -1)
            llm.close()
            with torch.no_grad():
                mine = torch.log_softmax(back(x)[0].float(), -1)
            nxt = x[0, 1:, None]  # log p of each next token
            gap = (cpp[:-1].gather(1, nxt) - mine[:-1].gather(1, nxt)).abs().max().item()
            rows.append((qtype, out.stat().st_size / 1e6, secs, tok_ok, same, gap, nll(cpp), nll(mine), nll(ref)))
    print(f"| type | file MB | export s | llama.cpp ids = llmkit ids | greedy {args.tokens} tokens equal | "
          f"max abs log p gap (llama.cpp vs llmkit, same file) | NLL llama.cpp | NLL llmkit (GGUF) | NLL fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q, mb, s, ok, same, gap, a, b, c in rows:
        print(f"| {q} | {mb:.2f} | {s:.1f} | {'yes' if ok else 'NO'} | {same}/{len(PROMPTS)} | {gap:.2e} | "
              f"{a:.4f} | {b:.4f} | {c:.4f} |")


if __name__ == "__main__":
    main()
