"""Multi-process training on CPU (gloo): 2-process DDP and FSDP2 give the loss of one process with the
same global batch (tail weight averaging included), and a checkpoint written by FSDP (weights, optimiser
state and the running weight mean) resumes in a single process."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _shared import free_port, rank_env

from llmkit.config import load_config
from llmkit.recipes.pretrain import PretrainConfig, pretrain
from llmkit.tokenizer import Tokenizer
from llmkit.train.data import prepare
from llmkit.train.loop import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _cfg(data_dir, out, strategy="ddp", *extra):
    return load_config(PretrainConfig, None, [
        f"data.dir={data_dir}", f"train.out_dir={out}", f"train.steps={STEPS}", "train.batch_size=8",
        "train.micro_batch_size=2", "data.seq_len=32", "train.eval_every=2", "train.eval_batches=2",
        "train.ckpt_every=2", f"train.strategy={strategy}", "train.progress=false", "optim.warmup_steps=1",
        "optim.lr=1e-2", "train.device=cpu", "train.threads=1", "train.sample_tokens=4",
        # steps 2-4 are averaged: the last val_loss scores the (FSDP-sharded) mean, and the step-2
        # checkpoint carries a mean gathered from the shards that a resumed run must continue
        "train.average_tail=0.7", *extra])


def _worker(rank, world, port, data_dir, out, strategy):
    rank_env(rank, world, port)
    from llmkit.train.dist import cleanup

    try:
        pretrain(_cfg(data_dir, out, strategy), force=True)
    finally:
        cleanup()


def _curve(out):
    recs = read_metrics(Path(out) / "metrics.jsonl")
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    text = (REPO / "llmkit" / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    (d / "a.txt").write_text(text[:16_000])
    (d / "b.txt").write_text(text[16_000:])
    tok = Tokenizer.train([d / "a.txt"], 300)
    prepare([d / "a.txt"], tok, d / "tokens", val_inputs=[d / "b.txt"], progress=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pretrain(_cfg(d / "tokens", d / "single"))  # one process, global batch 8 = 2 x 4 accumulation
    torch.set_num_threads(n)
    return d


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(setup, strategy):
    out = setup / strategy
    mp.spawn(_worker, args=(2, free_port(), str(setup / "tokens"), str(out), strategy), nprocs=2)
    (single, single_val), (multi, multi_val) = _curve(setup / "single"), _curve(out)
    assert len(single) == len(multi) == STEPS and len(multi_val) == len(single_val) == 2
    diff = max(abs(a - b) for a, b in zip(single + single_val, multi + multi_val))
    print(f"{strategy}: max |loss difference| vs one process over {STEPS} steps = {diff:.2e}")
    assert diff < 1e-5
    assert single[-1] < single[0]  # it trained
    s = json.loads((out / "summary.json").read_text())
    assert s["world"] == 2 and s["strategy"] == strategy


def test_fsdp_checkpoint_resumes_in_one_process(setup):
    """The step-2 checkpoint of the 2-process FSDP run continues in one process like the 1-process run."""
    out = setup / "resumed"
    fsdp_ckpt = setup / "fsdp" / "checkpoints" / "step_00000002"
    if not fsdp_ckpt.is_dir():
        pytest.skip("needs test_two_processes_equal_one[fsdp] first")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(_cfg(setup / "tokens", out), resume=str(fsdp_ckpt))
    finally:
        torch.set_num_threads(n)
    single, single_val = _curve(setup / "single")
    resumed, resumed_val = _curve(out)
    assert len(resumed) == STEPS - 2
    assert max(abs(a - b) for a, b in zip(single[2:], resumed)) < 1e-5
    assert (setup / "fsdp" / "checkpoints" / "step_00000002" / "average.safetensors").is_file()
    assert abs(single_val[-1] - resumed_val[-1]) < 1e-5  # the final weights: the same 3-step mean
