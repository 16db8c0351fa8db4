"""Pretraining pieces: schedule, optimiser groups, data shards and loader, accumulation, overfitting,
exact resume after SIGKILL, bad input (empty corpus, short corpus, tiny vocab, unknown key, NaN, disk full)."""

import errno
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.config import load_config
from llmkit.errors import LLMKitError
from llmkit.loading import load_model
from llmkit.models import ModelConfig, Transformer
from llmkit.recipes.pretrain import PretrainConfig, pretrain
from llmkit.tokenizer import Tokenizer
from llmkit.train import checkpoint as ckpt
from llmkit.train.data import BatchLoader, TokenShards, prepare
from llmkit.train.loop import lm_loss, read_metrics, train_step
from llmkit.train.optim import MuonAdamW, build_adamw, build_muon, newton_schulz, param_groups
from llmkit.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "llmkit" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    text = CORPUS.read_text()[:40_000]
    (d / "a.txt").write_text(text[:30_000])
    (d / "b.txt").write_text(text[30_000:])
    return d


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train([corpus / "a.txt"], 300)


@pytest.fixture(scope="module")
def data_dir(corpus, tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "d"
    prepare([corpus / "a.txt"], tok, out, val_inputs=[corpus / "b.txt"], progress=False)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one torch thread


def small_cfg(data_dir, out, *over) -> PretrainConfig:
    base = [f"data.dir={data_dir}", f"train.out_dir={out}", "data.seq_len=32", "train.batch_size=4",
            "train.steps=12", "train.eval_every=0", "train.eval_batches=2", "train.ckpt_every=4",
            "train.progress=false", "train.sample_tokens=4", "optim.warmup_steps=2", "train.device=cpu"]
    return load_config(PretrainConfig, None, base + list(over))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


# ---------------------------------------------------------------- schedule and optimiser
def test_lr_schedule_values():
    kw = dict(max_lr=1.0, min_lr=0.1, total_steps=110, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # warm-up: (step+1)/warmup
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # start of decay
    assert lr_at(60, **kw) == pytest.approx(0.55)  # cosine midpoint: min + (max-min)/2
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(60, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_at(35, kind="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(90, kind="constant", **kw) == 1.0
    with pytest.raises(LLMKitError, match="unknown lr schedule"):
        lr_at(0, kind="step", **kw)


def test_weight_decay_groups():
    model = Transformer(ModelConfig.from_preset("tiny-gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # every parameter once (tied head too)


def test_muon_equals_torch_muon_and_adamw():
    """MuonAdamW's two rules against torch.optim.Muon (Moonshot's RMS-matched LR) and torch.optim.AdamW.
    torch runs Newton-Schulz in bfloat16, llmkit in fp32: the Muon side agrees to bf16 precision."""
    torch.manual_seed(0)
    W, b = torch.randn(48, 160), torch.randn(160)
    p1, p2, q1, q2 = (t.clone().requires_grad_() for t in (W, W, b, b))
    ours = MuonAdamW([{"params": [p1], "muon": True}, {"params": [q1]}], lr=0.01, weight_decay=0.1)
    ref_m = torch.optim.Muon([p2], lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True,
                             adjust_lr_fn="match_rms_adamw")
    ref_a = torch.optim.AdamW([q2], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        g, h = torch.randn(48, 160), torch.randn(160)
        p1.grad, p2.grad, q1.grad, q2.grad = g.clone(), g.clone(), h.clone(), h.clone()
        for o in (ours, ref_m, ref_a):
            o.step()
    step = 0.01 * 0.2 * 160 ** 0.5  # size of one Muon update entry ~ this
    assert (p1 - p2).abs().max() < 0.05 * step and (p1 - W).abs().max() > step
    assert (q1 - q2).abs().max() < 1e-6
    sv = torch.linalg.svdvals(newton_schulz(torch.randn(64, 192)))
    assert 0.6 < float(sv.min()) and float(sv.max()) < 1.25  # all directions ~ the same size


def test_muon_batches_same_shape_matrices():
    """Same-shape (and transposed-shape) weights are orthogonalised as one stack: the result equals
    torch.optim.Muon run on each weight alone (both in bfloat16)."""
    torch.manual_seed(0)
    Ws = [torch.randn(48, 160), torch.randn(160, 48), torch.randn(48, 160), torch.randn(32, 32)]
    ours = [W.clone().requires_grad_() for W in Ws]
    refs = [W.clone().requires_grad_() for W in Ws]
    opt = MuonAdamW([{"params": ours, "muon": True}], lr=0.01, weight_decay=0.1, ns_dtype="bfloat16")
    ref_opts = [torch.optim.Muon([r], lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw") for r in refs]
    for _ in range(3):
        for p, r in zip(ours, refs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        for o in ref_opts:
            o.step()
    for p, r, W in zip(ours, refs, Ws):
        step = 0.01 * 0.2 * max(W.shape) ** 0.5
        assert (p - r).abs().max() < 0.05 * step and (p - W).abs().max() > 0.5 * step  # agree; moved
    G = torch.randn(3, 64, 192)
    stacked = newton_schulz(G)
    for g, o in zip(G, stacked):
        assert torch.allclose(newton_schulz(g), o, atol=1e-5)


def test_muon_groups_and_pretrain_resume(data_dir, tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    opt = build_muon(model, 1e-3)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (p.dim() == 2 and name.startswith("layers.")), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    out = tmp_path / "m"
    pretrain(small_cfg(data_dir, out, "train.steps=4", "train.ckpt_every=2", "optim.name=muon"))
    s = pretrain(small_cfg(data_dir, out, "train.steps=6", "optim.name=muon"), resume=True)
    assert s["steps"] == 6 and math.isfinite(s["val_loss"])
    with pytest.raises(LLMKitError, match="optim.name"):
        pretrain(small_cfg(data_dir, tmp_path / "x", "optim.name=lion"))


def test_tied_embeddings_checkpoint_and_resume(data_dir, tmp_path):
    """A tied head is one Parameter under two names: stored once (safetensors refuses shared memory),
    re-tied on load, and the resumed run continues the uninterrupted one exactly."""
    import shutil

    tie = ("model.tie_embeddings=true", "train.threads=1", "train.steps=6", "train.ckpt_every=2")
    pretrain(small_cfg(data_dir, tmp_path / "full", *tie))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for d in ("checkpoints/step_00000004", "checkpoints/step_00000006", "final"):  # as if killed after step 2
        shutil.rmtree(tmp_path / "cut" / d)
    resumed = pretrain(small_cfg(data_dir, tmp_path / "cut", *tie), resume=True)
    assert resumed["steps"] == 6
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-6
    model, _ = load_model(str(tmp_path / "cut" / "final"))
    assert model.lm_head.weight is model.embed_tokens.weight


# ---------------------------------------------------------------- data
def test_shards_round_trip_corpus(tmp_path, tok):
    docs = ["First document.\nWith two lines.", "Second: ünïcödé → ok", "third\n\n\nspaced  out", "4th", "fifth doc"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:]))
    (tmp_path / "a.txt").write_text(docs[0])
    m = prepare([tmp_path / "a.txt", tmp_path / "d.jsonl"], tok, tmp_path / "out", val_fraction=0.4,
                shard_tokens=7, progress=False)
    assert m["dtype"] == "uint16" and m["tokenizer_fingerprint"] == tok.fingerprint()
    # exact document split: floor((i+1)*0.4) > floor(i*0.4) for i = 2 and 4
    assert m["splits"]["train"]["documents"] == 3 and m["splits"]["val"]["documents"] == 2
    assert len(m["splits"]["train"]["shards"]) > 1  # small shards: several files
    got = {}
    for split in ("train", "val"):
        ids = TokenShards(tmp_path / "out", split).tokens().tolist()
        assert ids[-1] == tok.eos_id
        pieces, cur = [], []
        for i in ids:  # EOS separates documents
            if i == tok.eos_id:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        got[split] = pieces
        assert m["splits"][split]["bytes"] == sum(len(p.encode()) for p in pieces)
    assert got["train"] == [docs[0], docs[1], docs[3]] and got["val"] == [docs[2], docs[4]]
    with pytest.raises(LLMKitError, match="already exists"):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "out", progress=False)


def test_parquet_input(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two docs"]}), tmp_path / "x.parquet")
    prepare([tmp_path], tok, tmp_path / "o", progress=False)
    ids = TokenShards(tmp_path / "o", "train").tokens().tolist()
    assert tok.decode(ids) == "one doc<|endoftext|>two docs<|endoftext|>"


def test_resume_drops_a_truncated_metrics_line_and_writes_nothing_until_validated(data_dir, tmp_path, capsys):
    """A kill mid-append leaves half a JSON line at the end of metrics.jsonl: the resume drops it with a
    warning and continues exactly. Damage elsewhere (a bad middle line), or a checkpoint at or past the
    last step, fails with one line and leaves config.json and metrics.jsonl as they were."""
    import shutil

    common = ("train.threads=1", "train.steps=6", "train.ckpt_every=2")
    pretrain(small_cfg(data_dir, tmp_path / "full", *common))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for d in ("checkpoints/step_00000004", "checkpoints/step_00000006", "final"):  # killed during step 5's log
        shutil.rmtree(cut / d)
    metrics = cut / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if json.loads(ln)["step"] <= 4]
    metrics.write_text("".join(kept) + '{"step": 5, "loss": 4.1')  # half a line, no newline

    # a bad line that is not the last one is damage, not an interrupted append: refused, nothing rewritten
    bad = "".join(kept[:1]) + "garbage\n" + "".join(kept[1:]) + '{"step": 5, "lo'
    metrics.write_text(bad)
    config_before = (cut / "config.json").read_bytes()
    with pytest.raises(LLMKitError, match=r"metrics\.jsonl:2: not a metrics record"):
        pretrain(small_cfg(data_dir, cut, *common, "train.log_every=2"), resume=True)
    assert metrics.read_text() == bad and (cut / "config.json").read_bytes() == config_before

    metrics.write_text("".join(kept) + '{"step": 5, "loss": 4.1')
    capsys.readouterr()
    resumed = pretrain(small_cfg(data_dir, cut, *common), resume=True)
    assert "dropped a truncated last line" in capsys.readouterr().err
    assert resumed["steps"] == 6
    a, b = losses(tmp_path / "full"), losses(cut)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-6
    assert all(ln.endswith("\n") for ln in metrics.read_text().splitlines(keepends=True))

    # resuming a checkpoint at the run's last step: refused before anything is written
    metrics_before, config_before = metrics.read_bytes(), (cut / "config.json").read_bytes()
    with pytest.raises(LLMKitError, match="at step 6"):
        pretrain(small_cfg(data_dir, cut, *common, "train.log_every=2"), resume=True)
    assert metrics.read_bytes() == metrics_before and (cut / "config.json").read_bytes() == config_before


def test_loader_resume_and_rank_slices(data_dir):
    shards = TokenShards(data_dir, "train")
    a = BatchLoader(shards, 32, 6, seed=3)
    seen = [a.next_global_indices() for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch()[0] for _ in range(a.windows_per_epoch // 6 + 5)]  # crosses an epoch boundary
    b = BatchLoader(shards, 32, 6, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()[0]) for x in rest)
    c = BatchLoader(shards, 32, 6, seed=3)
    assert c.next_global_indices() == seen[0]
    # two ranks read disjoint halves whose concatenation is the global batch
    g = BatchLoader(shards, 32, 6, seed=9).next_batch()
    parts = [BatchLoader(shards, 32, 6, seed=9, rank=r, world=2).next_batch() for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), g[0]) and torch.equal(torch.cat([p[1] for p in parts]), g[1])
    assert torch.equal(g[0][:, 1:], g[1][:, :-1])  # y is x shifted by one


# ---------------------------------------------------------------- loop
def test_grad_accumulation_equals_full_batch():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-llama")
    x = torch.randint(0, cfg.vocab_size, (8, 17))
    results = []
    for split in (8, 2):  # one batch of 8 vs 4 micro-batches of 2
        torch.manual_seed(1)
        model = Transformer(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # params move by exactly the clipped gradient
        micro = [{"idx": a, "targets": b} for a, b in zip(x[:, :-1].split(split), x[:, 1:].split(split))]
        res = train_step(model, opt, micro, loss_fn=lm_loss, grad_clip=1.0)
        results.append((res, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (r1, p1), (r2, p2) = results
    assert abs(r1["loss"] - r2["loss"]) < 1e-6 and abs(r1["grad_norm"] - r2["grad_norm"]) < 1e-6
    assert (p1 - p2).abs().max() < 1e-6


def test_tiny_model_overfits_short_text():
    torch.manual_seed(0)
    text = torch.tensor(list(b"To be, or not to be, that is the question: whether 'tis nobler in the mind."))
    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    opt = build_adamw(model, 1e-2, weight_decay=0.0)
    x, y = text[None, :-1], text[None, 1:]
    first = None
    for _ in range(150):
        r = train_step(model, opt, [{"idx": x, "targets": y}], loss_fn=lm_loss)
        first = first or r["loss"]
    assert first > 5.0 and r["loss"] < 0.5  # memorised (the text's unigram entropy is ~2.9 nats)


def test_pretrain_run_outputs_and_moe(data_dir, tmp_path):
    s = pretrain(small_cfg(data_dir, tmp_path / "r", "train.steps=6", "train.eval_every=3", "train.keep_last=1",
                           "train.ckpt_every=2", "preset=tiny-mixtral", "model.n_layer=1"))
    out = tmp_path / "r"
    assert (out / "loss.png").stat().st_size > 1000 and (out / "final" / "llmkit.json").is_file()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000006"]  # keep last 1
    recs = read_metrics(out / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(recs[0])
    assert sum("val_bpb" in r for r in recs) == 2 and s["val_bpb"] > 0 and s["model_config"]["n_expert"] == 4
    from llmkit.loading import load_model

    model, t = load_model(str(out / "final"))
    assert model.cfg.n_expert == 4 and t.vocab_size == 300
    meta = json.loads((out / "final" / "llmkit.json").read_text())["meta"]
    assert meta["config"]["train"]["steps"] == 6
    with pytest.raises(LLMKitError, match="already exists"):
        pretrain(small_cfg(data_dir, out))


def test_sigkill_and_resume_reproduces_loss_curve(data_dir, tmp_path):
    ref = tmp_path / "ref"
    pretrain(small_cfg(data_dir, ref, "train.steps=120", "train.threads=1"))
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "llmkit", "pretrain", f"data.dir={data_dir}", f"train.out_dir={run}",
            "data.seq_len=32", "train.batch_size=4", "train.steps=120", "train.eval_every=0", "train.eval_batches=2",
            "train.ckpt_every=4", "train.progress=false", "train.sample_tokens=4", "optim.warmup_steps=2",
            "train.device=cpu", "train.threads=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.list_checkpoints(run / "checkpoints") and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = ckpt.latest_checkpoint(run / "checkpoints")
    assert killed_at is not None
    pretrain(small_cfg(data_dir, run, "train.steps=120", "train.threads=1"), resume=True)
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 121))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6


# ---------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path, tok, data_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LLMKitError, match="empty"):
        prepare([tmp_path / "empty.txt"], tok, tmp_path / "e", progress=False)
    (tmp_path / "short.txt").write_text("too short")
    prepare([tmp_path / "short.txt"], tok, tmp_path / "s", progress=False)
    with pytest.raises(LLMKitError, match="shorter than one sequence"):
        BatchLoader(TokenShards(tmp_path / "s", "train"), 32, 4)
    with pytest.raises(LLMKitError, match="too small"):
        Tokenizer.train([tmp_path / "short.txt"], 100)
    with pytest.raises(LLMKitError, match=r"'optim.lrr'.*'lr'"):
        load_config(PretrainConfig, None, ["optim.lrr=1e-3"])
    with pytest.raises(LLMKitError, match="n_layr"):
        pretrain(small_cfg(data_dir, tmp_path / "m", "model.n_layr=3"))
    with pytest.raises(LLMKitError, match="multiple of micro_batch_size"):
        pretrain(small_cfg(data_dir, tmp_path / "b", "train.micro_batch_size=3"))


def test_nan_loss_stops_with_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import llmkit.recipes.pretrain as rp

    real = rp.train_step
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        r = real(*a, **k)
        return {**r, "loss": float("nan")} if len(calls) == 6 else r

    monkeypatch.setattr(rp, "train_step", flaky)
    with pytest.raises(LLMKitError, match=r"loss became nan at step 6.*step_00000004"):
        pretrain(small_cfg(data_dir, tmp_path / "n"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "n" / "checkpoints")] == ["step_00000004"]


def test_disk_full_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    real = ckpt.save_file
    calls = []

    def full_disk(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second checkpoint's first file (each writes model + train-state tensors)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(LLMKitError, match=r"No space left.*step_00000004 is intact"):
        pretrain(small_cfg(data_dir, tmp_path / "f"))
    left = ckpt.list_checkpoints(tmp_path / "f" / "checkpoints")
    assert [p.name for p in left] == ["step_00000004"]
    assert not [p for p in (tmp_path / "f" / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    model = Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=300, max_seq_len=32))
    state = ckpt.load_train_state(left[0], model, build_adamw(model, 1e-3))
    assert state["step"] == 4 and state["loader"]["cursor"] == 16


def test_cli_data_prepare_and_plan(tmp_path, corpus, tok, capsys):
    from llmkit.cli import main

    tok.save(tmp_path / "tok")
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "o"), "--val-fraction", "0.5"]) == 0
    assert "train 1 documents" in capsys.readouterr().out
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", "--params", "1.8M", "--tokens-per-s", "8000", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["tokens"] == 36e6 and p["flops"] == pytest.approx(6 * 1.8e6 * 36e6) and p["seconds"] == 4500
    assert p["memory_bytes"]["fp32 AdamW"]["total"] == 16 * 1.8e6
    assert main(["plan", "--preset", "tiny-llama", "--tokens-per-s", "1e4"]) == 0
    assert "Chinchilla" in capsys.readouterr().out


def test_zero_intervals_mean_never_but_the_end(data_dir, tmp_path):
    """log_every=0, eval_every=0, ckpt_every=0 (and sample_every=0): no ZeroDivisionError; the last step
    is logged and evaluated, and its checkpoint is the only one."""
    s = pretrain(small_cfg(data_dir, tmp_path / "z", "train.steps=3", "train.log_every=0", "train.eval_every=0",
                           "train.ckpt_every=0"))
    recs = read_metrics(tmp_path / "z" / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [3] and [r["step"] for r in recs if "val_loss" in r] == [3]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "z" / "checkpoints")] == ["step_00000003"]
    assert s["steps"] == 3 and "val_loss" in s
    with pytest.raises(LLMKitError, match="'train.log_every' must be >= 0"):
        pretrain(small_cfg(data_dir, tmp_path / "n", "train.log_every=-1"))


def test_activation_checkpointing_same_losses(data_dir, tmp_path):
    pretrain(small_cfg(data_dir, tmp_path / "plain", "train.steps=5", "train.ckpt_every=0"))
    pretrain(small_cfg(data_dir, tmp_path / "ac", "train.steps=5", "train.ckpt_every=0",
                       "train.activation_checkpointing=true"))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert len(a) == 5 and max(abs(a[s] - b[s]) for s in a) < 1e-6


# ---------------------------------------------------------------- tail averaging
def _weights(d: Path) -> dict[str, torch.Tensor]:
    """A step checkpoint's tensors, or an exported checkpoint's (`final`) under the same names."""
    from safetensors.torch import load_file

    if (d / "train_state.json").is_file():
        return load_file(str(d / "model.safetensors"))
    return {k: v.detach() for k, v in load_model(str(d))[0].state_dict().items()}


def test_tail_average_is_the_mean_of_the_last_steps_and_resumes(data_dir, tmp_path):
    """average_tail=0.5 of 12 steps: the final checkpoint holds the mean of the weights after steps
    7..12 (read from a run that saved every step), the step checkpoint keeps step 12's own weights,
    and a run killed after step 8 resumes the same mean."""
    import shutil

    common = ("train.steps=12", "train.threads=1", "model.tie_embeddings=true")
    pretrain(small_cfg(data_dir, tmp_path / "every", *common, "train.ckpt_every=1", "train.keep_last=12"))
    raw = {s: _weights(tmp_path / "every" / "checkpoints" / f"step_{s:08d}") for s in range(1, 13)}
    s = pretrain(small_cfg(data_dir, tmp_path / "avg", *common, "train.average_tail=0.5"))
    assert s["averaged_steps"] == 6
    final = _weights(tmp_path / "avg" / "final")
    assert raw[12].keys() <= final.keys()
    for k in raw[12]:
        mean = torch.stack([raw[i][k] for i in range(7, 13)]).mean(0)
        assert torch.allclose(final[k], mean, atol=1e-6), k
        assert not torch.allclose(final[k], raw[12][k], atol=1e-6) or raw[7][k].equal(raw[12][k]), k
    step12 = _weights(tmp_path / "avg" / "checkpoints" / "step_00000012")
    assert all(step12[k].equal(raw[12][k]) for k in step12)  # a resume continues from the raw weights

    shutil.copytree(tmp_path / "avg", tmp_path / "cut")
    for d in ("checkpoints/step_00000012", "final"):  # as if killed after step 8 (its checkpoint has n=2)
        shutil.rmtree(tmp_path / "cut" / d)
    assert (tmp_path / "cut" / "checkpoints" / "step_00000008" / "average.safetensors").is_file()
    assert not (tmp_path / "cut" / "checkpoints" / "step_00000004" / "average.safetensors").exists()
    resumed = pretrain(small_cfg(data_dir, tmp_path / "cut", *common, "train.average_tail=0.5"), resume=True)
    assert resumed["averaged_steps"] == 6
    again = _weights(tmp_path / "cut" / "final")
    assert max((again[k] - final[k]).abs().max().item() for k in raw[12]) < 1e-6
    with pytest.raises(LLMKitError, match="average_tail"):
        pretrain(small_cfg(data_dir, tmp_path / "bad", "train.average_tail=1"))


def test_training_state_round_trips_without_pickle(tmp_path):
    """train_state.json + .safetensors hold optimiser moments, RNG states, tuples (random.getstate())
    and non-string keys exactly; nothing in a step checkpoint is a pickle."""
    import math
    import random

    from llmkit.train import checkpoint as ckpt

    state = {"step": 3, "rng": {"torch": torch.get_rng_state()}, "python": random.getstate(),
             "optimizer": {"state": {"w": {"exp_avg": torch.randn(4, 3), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 1e-3, "params": ["w"], "betas": (0.9, 0.95)}]},
             "ints": {1: "a", 2: None}, "odd": {"__tensor__": "not a reference"}, "nan": float("nan")}
    ckpt.write_state(tmp_path, state)
    back = ckpt.read_state(tmp_path)
    assert back["python"] == state["python"] and back["ints"] == state["ints"] and back["odd"] == state["odd"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"] and math.isnan(back["nan"])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert torch.equal(back["optimizer"]["state"]["w"]["exp_avg"], state["optimizer"]["state"]["w"]["exp_avg"])
    random.setstate(back["python"])  # the structure random needs (tuples) survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.json", "train_state.safetensors"]
    (tmp_path / "train_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(LLMKitError, match="cannot read"):
        ckpt.read_state(tmp_path)


@pytest.mark.parametrize("override,message", [
    ("optim.beta2=2", "'optim.beta2' must be in [0,1), got 2.0"),
    ("optim.lr=nan", "'optim.lr' must be a finite number, got nan"),
    ("optim.lr=-1", "'optim.lr' must be > 0, got -1.0"),
    ("optim.grad_clip=inf", "'optim.grad_clip' must be a finite number, got inf"),
    ("train.log_every=-1", "'train.log_every' must be >= 0, got -1"),
    ("train.ckpt_every=-1", "'train.ckpt_every' must be >= 0, got -1"),
    ("train.threads=-1", "'train.threads' must be > 0, got -1"),
    ("train.max_tokens=-5", "'train.max_tokens' must be > 0, got -5"),
    ("train.time_budget_s=-5", "'train.time_budget_s' must be > 0, got -5.0"),
    ("optim.warmup_steps=-1", "'optim.warmup_steps' must be >= 0, got -1"),
    ("train.seed=1e23", "'train.seed' must be in [0,9.2e18]"),
])
def test_config_ranges_are_checked_before_any_work(override, message, capsys):
    """One validation layer: a range declared with the field (config.ranged), every float finite; the
    CLI answers with one line and exit 2."""
    from llmkit.cli import main

    with pytest.raises(LLMKitError, match=re.escape(message)):
        load_config(PretrainConfig, None, [override])
    assert main(["pretrain", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmkit: error: config key")


def test_force_starts_a_new_run_and_resume_refuses_another_runs_checkpoint(data_dir, tmp_path):
    """The splice: run A (8 steps, checkpoints every 2), then run B over it with --force (seed 99, 4 steps,
    every 1), then --resume to 6: B's checkpoints and metrics only, nothing of A's. And a resume with
    a different seed (another run) is refused, naming the key."""
    out = tmp_path / "r"
    (tmp_path / "r").mkdir()
    (out / "notes.txt").write_text("mine")  # not the run's: --force keeps it
    pretrain(small_cfg(data_dir, out, "train.steps=8", "train.ckpt_every=2"), force=True)
    pretrain(small_cfg(data_dir, out, "train.steps=4", "train.ckpt_every=1", "train.seed=99"), force=True)
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [f"step_0000000{i}" for i in (2, 3, 4)]
    s = pretrain(small_cfg(data_dir, out, "train.steps=6", "train.ckpt_every=1", "train.seed=99"), resume=True)
    assert s["steps"] == 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(LLMKitError, match=r"belongs to a different run \(train.seed = 99 there, 1337 here"):
        pretrain(small_cfg(data_dir, out, "train.steps=8"), resume=True)


def test_pretrain_deepseek_with_mtp(data_dir, tmp_path):
    """model.mtp_depth=1 trains through the recipe: MLA + DeepSeekMoE with the MTP loss and the load-
    balancing loss (the MTP block's router logits refreshed every step), and the saved model drafts."""
    s = pretrain(small_cfg(data_dir, tmp_path / "r", "train.steps=3", "preset=tiny-deepseek", "model.mtp_depth=1"))
    assert math.isfinite(s["final_loss"]) and s["model_config"]["mtp_depth"] == 1
    from llmkit.inference import SamplingParams, generate, mtp_generate

    model, _ = load_model(str(tmp_path / "r" / "final"))
    p = SamplingParams(max_new_tokens=8, temperature=0)
    assert mtp_generate(model.eval(), [5, 6, 7], p).tokens == generate(model, [5, 6, 7], p).tokens
