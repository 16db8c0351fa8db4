"""Fine-tuning on 2 processes (gloo, CPU): DDP and FSDP2, LoRA and full fine-tuning, give the losses of
one process with the same global batch (the SFT loss is normalised by the global batch's completion
tokens, so the split does not matter), and the same output weights."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _shared import byte_chat_tokenizer, free_port, rank_env

from llmkit.config import load_config
from llmkit.recipes.finetune import FinetuneConfig, finetune
from llmkit.train.loop import read_metrics

STEPS = 3
TOY = [{"instruction": f"colour of {k}", "output": v} for k, v in
       [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
        ("sun", "yellow"), ("night", "dark"), ("milk", "white, of course")]]


def _tok():
    return byte_chat_tokenizer()


def _cfg(root, out, method, strategy="ddp", *extra):
    # global batch 4 examples of different lengths; one process accumulates 4 micro-batches of 1
    return load_config(FinetuneConfig, None, [
        f"model={root / 'base'}", f"data.files=[{root / 'toy.jsonl'}]", f"method={method}", f"train.out_dir={out}",
        "data.seq_len=64", "train.batch_size=4", "train.micro_batch_size=1", f"train.steps={STEPS}",
        "train.eval_every=2", "train.ckpt_every=0", "data.val_fraction=0.25", "optim.lr=1e-2", "optim.warmup_steps=1",
        "train.device=cpu", "train.threads=1", "train.progress=false", f"train.strategy={strategy}",
        "lora.dropout=0", *extra])  # dropout masks depend on how rows are split across ranks


def _worker(rank, world, port, root, strategy):
    rank_env(rank, world, port)
    from llmkit.train.dist import cleanup

    try:
        for method in ("lora", "full"):  # one process group for both: spawning dominates the test's time
            finetune(_cfg(Path(root), Path(root) / f"{method}-{strategy}", method, strategy), quiet=True, force=True)
    finally:
        cleanup()


def _curve(out):
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return [r["loss"] for r in recs if "loss" in r] + [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.models import ModelConfig, Transformer

    d = tmp_path_factory.mktemp("ftdist")
    torch.manual_seed(0)
    save_checkpoint(Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=128)), d / "base",
                    tokenizer=_tok())
    (d / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    for method in ("lora", "full"):
        finetune(_cfg(d, d / f"{method}-single", method), quiet=True)
    torch.set_num_threads(n)
    return d


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(root, strategy):
    mp.spawn(_worker, args=(2, free_port(), str(root), strategy), nprocs=2)
    for method in ("lora", "full"):
        _check(root, method, strategy)


def _check(root, method, strategy):
    single, multi = _curve(root / f"{method}-single"), _curve(root / f"{method}-{strategy}")
    assert len(single) == len(multi) == STEPS + 3  # 3 train losses; val before, at step 2 and at the end
    diff = max(abs(a - b) for a, b in zip(single, multi))
    print(f"{method}/{strategy}: max |loss difference| vs one process = {diff:.2e}")
    assert diff < 1e-5 and single[STEPS - 1] < single[0]
    w1, w2 = _weights(root / f"{method}-single"), _weights(root / f"{method}-{strategy}")
    assert w1.keys() == w2.keys() and w1
    # Adam moves every entry by ~lr (1e-2) per step whatever its gradient's size, so summation-order noise
    # on near-zero gradients shows at ~1e-5..1e-4, far below one step
    assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) < 1e-3
    s = json.loads((root / f"{method}-{strategy}" / "finetune.json").read_text())["summary"]
    assert s["world"] == 2
