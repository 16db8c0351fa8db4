"""DeepSeek family measurements for BENCHMARKS.md.

1. KV-cache bytes per token for MHA / GQA / MLA at the same width: `kv_bytes_per_token(cfg)` beside the
   bytes the model's cache actually allocates (divided by its slots).
2. Multi-token prediction as a self-speculative draft: a tiny deepseek model (MLA + DeepSeekMoE,
   mtp_depth=1) pretrained briefly with the pretraining recipe on tinyshakespeare (last 10% held out),
   then greedy `mtp_generate` vs `generate` on held-out prompts: identical tokens, acceptance rate,
   target forwards per token.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/deepseek.py --minutes 4 --out /tmp/ds_bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmkit.inference import SamplingParams, generate, mtp_generate
from llmkit.models import ModelConfig, Transformer, kv_bytes_per_token

CORPUS = Path(__file__).resolve().parents[1] / "llmkit" / "data" / "tinyshakespeare.txt"


def kv_table(d_model: int = 2048, n_head: int = 16, n_layer: int = 24) -> list[dict]:
    base = dict(vocab_size=256, n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=4 * d_model, max_seq_len=16)
    hd = d_model // n_head
    cfgs = {f"MHA (H={n_head}, D={hd})": ModelConfig(**base),
            f"GQA (K={n_head // 4})": ModelConfig(**base, n_kv_head=n_head // 4),
            "MQA (K=1)": ModelConfig(**base, n_kv_head=1),
            f"MLA (r={4 * hd}, d_rope={hd // 2}), V2's ratios": ModelConfig(
                **base, attention="mla", kv_lora_rank=4 * hd, qk_nope_head_dim=hd, qk_rope_head_dim=hd // 2,
                v_head_dim=hd)}
    rows = []
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        cache = model.new_cache(1, 16, dtype=torch.bfloat16, device="cpu")
        measured = (cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()) // 16
        rows.append({"attention": name, "config_bytes": kv_bytes_per_token(cfg), "measured_bytes": measured,
                     "k_slot": list(cache.k.shape[2:]), "v_slot": list(cache.v.shape[2:])})
    return rows


def train(out: Path, minutes: float) -> Path:
    from llmkit.config import load_config
    from llmkit.recipes.pretrain import PretrainConfig, pretrain
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.data import prepare

    text = CORPUS.read_text()
    cut = int(len(text) * 0.9)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / "train.txt").write_text(text[:cut])
    (out / "corpus" / "val.txt").write_text(text[cut:])
    tok = Tokenizer.train([out / "corpus" / "train.txt"], 512)
    data = out / "tokens"
    prepare([out / "corpus" / "train.txt"], tok, data, val_inputs=[out / "corpus" / "val.txt"], progress=False)
    cfg = load_config(PretrainConfig, None, [
        f"data.dir={data}", f"train.out_dir={out / 'run'}", "data.seq_len=128", "train.batch_size=16",
        "train.steps=100000", f"train.time_budget_s={int(minutes * 60)}", "train.eval_every=0",
        "train.ckpt_every=0", "train.progress=false", "train.sample_tokens=0", "train.threads=1",
        "train.device=cpu", "optim.warmup_steps=20", "preset=tiny-deepseek", "model.mtp_depth=1",
        "model.d_model=96", "model.n_head=4", "model.n_layer=3"])
    summary = pretrain(cfg, tokenizer=tok)
    return out / "run" / "final", summary, tok, text[cut:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--out", default="/tmp/ds_bench")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    res = {"kv": kv_table()}
    for r in res["kv"]:
        print(r)
    final, summary, tok, val = train(out, args.minutes)
    from llmkit.loading import load_model

    model, _ = load_model(str(final))
    model.eval()
    params = SamplingParams(max_new_tokens=args.new, temperature=0)
    prop = acc = fwd = new = same = 0
    t_g = t_m = 0.0
    step = len(val) // args.prompts
    for i in range(args.prompts):
        prompt = tok.encode(val[i * step:i * step + 200])[:32]
        t0 = time.perf_counter()
        g = generate(model, prompt, params)
        t1 = time.perf_counter()
        m = mtp_generate(model, prompt, params)
        t2 = time.perf_counter()
        t_g, t_m = t_g + t1 - t0, t_m + t2 - t1
        same += g.tokens == m.tokens
        prop, acc, fwd = prop + m.stats["proposed"], acc + m.stats["accepted"], fwd + m.stats["target_forwards"]
        new += len(m.tokens)
    res["mtp"] = {"train_steps": summary.get("steps"), "final_loss": summary.get("final_loss"),
                  "val_bpb": summary.get("val_bpb"), "prompts": args.prompts, "identical_to_greedy": same,
                  "acceptance_rate": acc / prop, "tokens_per_target_forward": new / (fwd + args.prompts),
                  "greedy_s": round(t_g, 2), "mtp_s": round(t_m, 2)}
    print(json.dumps(res["mtp"], indent=1))
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
