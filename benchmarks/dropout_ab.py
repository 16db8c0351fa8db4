"""Interleaved A/B of one speedrun training step: torch nn.Dropout vs llmkit Dropout.

    python benchmarks/dropout_ab.py

Same model (the speedrun default: 4 layers, d_model 192, dropout 0.1), bf16 autocast, Muon, batch 8x256,
2 threads; median ms/step of 7 rounds of 5 steps per engine. Results: BENCHMARKS.md.
"""
import torch, time, statistics
import torch.nn as nn
from llmkit.models import Transformer, ModelConfig
from llmkit.models.modules import Dropout
from llmkit.train.optim import build_muon
from llmkit.train.loop import train_step, autocast_context
torch.set_num_threads(2); torch.manual_seed(0)
cfg = ModelConfig.from_preset("tiny-llama", vocab_size=512, max_seq_len=256, n_layer=4, n_head=6, n_kv_head=6, d_model=192, d_ff=512, dropout=0.1)
def make(kind):
    m = Transformer(cfg).train()
    if kind == "torch":
        for mod in m.modules():
            for name, ch in mod.named_children():
                if isinstance(ch, Dropout): setattr(mod, name, nn.Dropout(ch.p))
    return m, build_muon(m, lr=6e-3, weight_decay=0.5)
ac = autocast_context(torch.device("cpu"), "bfloat16")
x = torch.randint(0,512,(8,256)); y = torch.randint(0,512,(8,256))
eng = {k: make(k) for k in ("torch", "llmkit")}
res = {k: [] for k in eng}
for k,(m,o) in eng.items():
    for _ in range(3): train_step(m, o, [(x,y)], autocast=ac)
for r in range(7):
    for k,(m,o) in eng.items():
        t=time.perf_counter()
        for _ in range(5): train_step(m, o, [(x,y)], autocast=ac)
        res[k].append((time.perf_counter()-t)/5*1e3)
med = {k: statistics.median(v) for k,v in res.items()}
print({k: round(v,1) for k,v in med.items()}, "ms/step; speedup", round(med["torch"]/med["llmkit"],3))
