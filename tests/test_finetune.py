"""SFT data (formats, completion-only labels, packing, mixing), the fine-tuning recipe and the CLI."""

import json
from pathlib import Path

import pytest
import torch

from _shared import byte_chat_tokenizer

from llmkit.errors import LLMKitError
from llmkit.finetune.data import (IGNORE, document_mask, Example, example_stream, load_sft_data, packed_batch,
                                  read_records, to_messages, tokenize_chat)
from llmkit.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=512))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                     {"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "and again"},
                     {"role": "assistant", "content": "AGAIN"}]}


def test_labels_only_on_every_assistant_turn(tok):
    ids, labels = tokenize_chat(tok, to_messages(CHAT, "x"))
    assert len(ids) == len(labels)
    text = tok.decode(ids)
    assert text == tok.apply_chat_template(CHAT["messages"])
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == "HELLO<|im_end|>\nAGAIN<|im_end|>\n"
    assert all(lab == t for t, lab in zip(ids, labels) if lab != IGNORE)


def test_record_formats(tok):
    alpaca = to_messages({"instruction": "Add", "input": "1 2", "output": "3"}, "x")
    assert alpaca == [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    pr = to_messages({"prompt": "Q", "response": "A"}, "x", system="S")
    assert pr[0] == {"role": "system", "content": "S"} and pr[-1] == {"role": "assistant", "content": "A"}
    sg = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "x")
    assert sg == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_bad_records(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}])
    with pytest.raises(LLMKitError, match=r"d.jsonl:2: record has no 'response' field"):
        load_sft_data([str(p)], tok, 64)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(LLMKitError, match="is empty"):
        load_sft_data([str(tmp_path / "e.jsonl")], tok, 64)
    p = write_jsonl(tmp_path / "f.jsonl", [{"question": "?"}])
    with pytest.raises(LLMKitError, match="f.jsonl:1: unknown record format"):
        load_sft_data([str(p)], tok, 64)
    with pytest.raises(LLMKitError, match="not found"):
        load_sft_data([str(tmp_path / "missing.jsonl")], tok, 64)


def test_real_sft_file_loads(shared_data, tok):
    data = load_sft_data([str(shared_data / "sft/dolly_hhrlhf_small.jsonl")], tok, 8192, val_fraction=0.1,
                         max_records=40)
    assert len(data.val) == 4 and sum(len(t) for t in data.train) + data.dropped == 36
    assert len(read_records(shared_data / "preference/dpo_en_demo.json")) == 300


def test_packing_equals_separate_forwards(tok):
    model = tiny().eval()
    recs = [{"prompt": "a" * n, "response": "b" * (n + 2)} for n in (3, 9, 5, 20)]
    exs = [Example(*tokenize_chat(tok, to_messages(r, "x"))) for r in recs]
    batch = packed_batch(iter(exs + [Example([0] * 111, [IGNORE] * 111)]), batch_size=2, seq_len=110, pad_id=0, carry=[])
    with torch.no_grad():
        packed = model(batch["idx"], input_pos=batch["input_pos"], attn_mask=document_mask(batch["doc"]))
        row, start, n_docs = 0, 0, 0
        for e in exs:
            n = len(e.ids) - 1
            if start + n > 110:
                row, start = row + 1, 0
            alone = model(torch.tensor([e.ids[:-1]]))[0]
            assert (packed[row, start:start + n] - alone).abs().max() < 1e-5
            assert batch["targets"][row, start:start + n].tolist() == e.labels[1:]
            start += n
            n_docs += 1
    assert n_docs == 4 and row == 1


def test_prompt_tuned_packed_rows_and_seq_len_budget(tmp_path, tok):
    """A packed row through a prompt-tuned model: every document sees the soft prompt and only it
    (equal to the base model on [P; E[doc]]); a seq_len that leaves no room for the prompt is a clear error."""
    from llmkit.peft import apply_prompt_tuning
    from llmkit.recipes.finetune import finetune, sft_logits

    model = apply_prompt_tuning(tiny().eval(), n_tokens=3)
    P = model.prefix.weight
    exs = [Example(list(range(10 + n, 30 + 2 * n)), list(range(10 + n, 30 + 2 * n))) for n in (0, 5, 9)]
    batch = packed_batch(iter(exs), batch_size=1, seq_len=71, pad_id=0, carry=[])  # 19 + 24 + 28
    with torch.no_grad():
        packed = sft_logits(model, batch)
        model.prefix = None  # the reference: the prompt prepended by hand
        start = 0
        for e in exs:
            x = torch.tensor([e.ids[:-1]])
            alone = model(None, embeds=torch.cat([P[None], model.embed_tokens(x)], 1))[0, 3:]
            assert (packed[0, start:start + x.size(1)] - alone).abs().max() < 1e-5
            start += x.size(1)
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = ft_cfg(data, tmp_path / "p", "method=prompt", "data.seq_len=512", "train.batch_size=2", "train.steps=1",
                 "data.val_fraction=0.34", "prompt.n_tokens=3")
    with pytest.raises(LLMKitError, match=r"seq_len 512 does not fit the 509 tokens .* set data.seq_len <= 509"):
        finetune(cfg, model=tiny(), tokenizer=tok, quiet=True)


def test_mixing_weights():
    a = [Example([1, 2], [1, 2])]
    b = [Example([3, 4], [3, 4])]
    stream = example_stream([a, b], [3.0, 1.0], seed=0)
    draws = [next(stream).ids[0] for _ in range(2000)]
    assert abs(draws.count(1) / 2000 - 0.75) < 0.04


TOY = [{"instruction": f"colour of {k}", "output": v} for k, v in
       [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
        ("sun", "yellow")]]


def answer(model, tok, question):
    from llmkit.recipes.finetune import sft_logits

    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))
    out = []
    with torch.no_grad():
        for _ in range(8):
            logits = sft_logits(model, {"idx": torch.tensor([ids + out])})
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
    return tok.decode(out)


def ft_cfg(data, out, *over):
    """A FinetuneConfig from key=value overrides, as the CLI builds it (one torch thread, CPU)."""
    from llmkit.config import load_config
    from llmkit.recipes.finetune import FinetuneConfig

    return load_config(FinetuneConfig, None, ["model=tiny", f"data.files=[{data}]", f"train.out_dir={out}",
                                              "train.threads=1", "train.device=cpu", *over])


def test_tiny_model_learns_toy_instructions(tmp_path, tok):
    from llmkit.peft import load_adapter
    from llmkit.recipes.finetune import finetune, sft_logits

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = ft_cfg(data, tmp_path / "full", "method=full", "data.seq_len=96", "train.batch_size=6", "train.steps=60",
                 "optim.lr=1e-2", "optim.warmup_steps=5", "data.val_fraction=0.0")
    s = finetune(cfg, model=tiny(), tokenizer=tok, quiet=True)
    model, _ = __import__("llmkit.checkpoint", fromlist=["x"]).load_checkpoint(tmp_path / "full")
    correct = sum(answer(model, tok, r["instruction"]) == r["output"] for r in TOY)
    assert correct >= 5, [answer(model, tok, r["instruction"]) for r in TOY]
    assert (tmp_path / "full" / "metrics.jsonl").exists() and (tmp_path / "full" / "loss.png").exists()
    assert s["trainable_share"] == 1.0

    # LoRA on the learned model, packed: loss goes down, the adapter reloads to the same outputs
    recs = [{"instruction": r["instruction"], "output": r["output"].upper()} for r in TOY]
    data2 = write_jsonl(tmp_path / "upper.jsonl", recs)
    cfg = ft_cfg(data2, tmp_path / "lora", "method=lora", "data.seq_len=96", "train.batch_size=2", "train.steps=20",
                 "optim.lr=1e-2", "optim.warmup_steps=2", "data.val_fraction=0.34", "data.packing=true",
                 "train.eval_every=20")
    cfg.lora.targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    s = finetune(cfg, model=model, tokenizer=tok, quiet=True)
    assert s["val_loss_after"] < 0.5 * s["val_loss_before"]
    assert 0 < s["trainable_share"] < 0.2
    base, _ = __import__("llmkit.checkpoint", fromlist=["x"]).load_checkpoint(tmp_path / "full")
    again = load_adapter(base, tmp_path / "lora")
    x = {"idx": torch.randint(0, 256, (1, 20))}
    with torch.no_grad():
        assert (sft_logits(again, x) - sft_logits(model, x)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["qlora", "adapter", "prompt", "llama-adapter", "selective"])
def test_every_method_runs_and_reloads(tmp_path, tok, method):
    from llmkit.peft import load_adapter
    from llmkit.recipes.finetune import finetune, sft_logits

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = ft_cfg(data, tmp_path / method, f"method={method}", "data.seq_len=64", "train.batch_size=2", "train.steps=2",
                 "data.val_fraction=0.34")
    cfg.llama_adapter.n_layers = 1
    cfg.selective.top_n_layers = 1
    cfg.prompt.n_tokens = 3
    model = tiny()
    s = finetune(cfg, model=model, tokenizer=tok, quiet=True)
    assert 0 < s["trainable_share"] < 1
    if method == "selective":
        return
    again = load_adapter(tiny(), tmp_path / method)
    x = {"idx": torch.randint(0, 256, (1, 10))}
    tol = 0.1 if method == "qlora" else 1e-5  # trained on the NF4 base, reloaded on the full-precision one
    with torch.no_grad():
        assert (sft_logits(again, x) - sft_logits(model, x)).abs().max() < tol


def test_cli_finetune_merge(tmp_path, tok, capsys):
    from llmkit.checkpoint import load_checkpoint, save_checkpoint
    from llmkit.cli import main
    from llmkit.peft import load_adapter

    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    args = ["finetune", "--model", str(tmp_path / "base"), "--data", f"{data}:2,{data}", "--method", "lora",
            "--out", str(tmp_path / "ad"), "train.steps=2", "train.batch_size=2", "data.seq_len=64", "optim.lr=5e-5"]
    assert main(args + ["lora.r=2"]) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["lora.r=0", "--force"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(args + ["lora.targets=[q_proj,nope]", "--force"]) == 2
    assert "'nope' does not exist" in capsys.readouterr().err
    assert main(args[:7] + ["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "ad2"), "train.steps=1",
                            "train.batch_size=2", "data.seq_len=64"]) == 0
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_checkpoint(tmp_path / "merged")
    adapted = load_adapter(load_checkpoint(tmp_path / "base")[0], tmp_path / "ad")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() < 1e-5


# ---------------------------------------------------------------- resume, intervals
class Cut(Exception):
    """Stands for the process dying between two steps."""


def _losses(out):
    from llmkit.train.loop import read_metrics

    recs = read_metrics(out / "metrics.jsonl")
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]


@pytest.mark.parametrize("method,extra", [("lora", ["data.packing=true", "lora.dropout=0.2"]),
                                          ("full", ["train.micro_batch_size=1"])])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tok, monkeypatch, method, extra):
    """Cut after step 5 of 6 (last checkpoint: step 4), resume: the same losses, val losses and weights as
    a run never cut. LoRA dropout draws from the RNG, packing carries examples across steps, and
    micro_batch_size=1 accumulates: all three are part of the state."""
    import llmkit.recipes.finetune as rf
    from llmkit.recipes.finetune import finetune
    from llmkit.train import checkpoint as ckpt

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    common = [f"method={method}", "data.seq_len=64", "train.batch_size=2", "train.steps=6", "train.ckpt_every=2",
              "data.val_fraction=0.34", "train.eval_every=3", "optim.lr=1e-2", *extra]
    ref = finetune(ft_cfg(data, tmp_path / "ref", *common), model=tiny(), tokenizer=tok, quiet=True)
    assert not (tmp_path / "ref.partial").exists()  # spent once the output is written

    real, calls = rf.train_step, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise Cut
        return real(*a, **k)

    monkeypatch.setattr(rf, "train_step", dies_at_step_5)
    with pytest.raises(Cut):
        finetune(ft_cfg(data, tmp_path / "cut", *common), model=tiny(), tokenizer=tok, quiet=True)
    monkeypatch.undo()
    left = ckpt.list_checkpoints(tmp_path / "cut.partial" / "checkpoints")
    assert [p.name for p in left] == ["step_00000002", "step_00000004"] and not (tmp_path / "cut").exists()
    if method == "lora":  # step checkpoints hold what trains, not the frozen base
        from safetensors import safe_open

        with safe_open(left[-1] / "model.safetensors", framework="pt") as f:
            assert f.keys() and all("lora" in k for k in f.keys())
        with pytest.raises(LLMKitError, match="does not fit this model"):  # another method's parameters
            finetune(ft_cfg(data, tmp_path / "cut", *common, "method=adapter"), model=tiny(), tokenizer=tok,
                     quiet=True, resume=True)
    with pytest.raises(LLMKitError, match="interrupted run"):
        finetune(ft_cfg(data, tmp_path / "cut", *common), model=tiny(), tokenizer=tok, quiet=True)
    s = finetune(ft_cfg(data, tmp_path / "cut", *common), model=tiny(), tokenizer=tok, quiet=True, resume=True)
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert [r[0] for r in a] == [r[0] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert (la is None) == (lb is None) and (va is None) == (vb is None)
        assert abs((la or 0) - (lb or 0)) < 1e-6 and abs((va or 0) - (vb or 0)) < 1e-6
    assert s["val_loss_before"] == ref["val_loss_before"] and s["completion_tokens"] == ref["completion_tokens"]
    assert abs(s["val_loss_after"] - ref["val_loss_after"]) < 1e-6 and a[-1][1] < a[1][1]  # it trained
    assert not (tmp_path / "cut.partial").exists()


def test_zero_intervals_mean_never_but_the_end(tmp_path, tok):
    """eval_every=0, log_every=0, ckpt_every=0: no ZeroDivisionError; only the final step is logged and
    evaluated (plus the val loss before training), and no step checkpoint is written."""
    from llmkit.recipes.finetune import finetune

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = ft_cfg(data, tmp_path / "z", "data.seq_len=64", "train.batch_size=2", "train.steps=3",
                 "data.val_fraction=0.34", "train.eval_every=0", "train.log_every=0", "train.ckpt_every=0")
    s = finetune(cfg, model=tiny(), tokenizer=tok, quiet=True)
    assert [(st, loss is not None, v is not None) for st, loss, v in _losses(tmp_path / "z")] == \
        [(0, False, True), (3, True, True)]
    assert s["val_loss_after"] is not None
    with pytest.raises(LLMKitError, match=r"'train.eval_every' must be >= 0"):
        finetune(ft_cfg(data, tmp_path / "n", "train.eval_every=-1"), model=tiny(), tokenizer=tok, quiet=True)


def test_sigkill_and_cli_resume(tmp_path, tok):
    """`llmkit finetune` killed with SIGKILL mid-run; `--resume` finishes it with the losses of an
    uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main
    from llmkit.train import checkpoint as ckpt

    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    args = ["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--method", "lora", "--device", "cpu",
            "train.steps=40", "train.batch_size=2", "data.seq_len=64", "train.ckpt_every=2", "train.threads=1",
            "data.val_fraction=0.34", "train.eval_every=0", "train.progress=false"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.list_checkpoints(Path(f"{run}.partial") / "checkpoints") \
            and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert main(args + ["--out", str(run)]) == 2  # an interrupted run is not overwritten silently
    assert main(args + ["--out", str(run), "--resume"]) == 0
    a, b = _losses(tmp_path / "ref"), _losses(run)
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(41))
    assert max(abs((x[1] or 0) - (y[1] or 0)) + abs((x[2] or 0) - (y[2] or 0)) for x, y in zip(a, b)) < 1e-6


def test_accumulation_equals_the_full_batch(tmp_path, tok):
    """The SFT loss is the token-weighted mean over the whole global batch however it is split into
    micro-batches (examples of different lengths: a mean of per-micro-batch means would differ)."""
    from llmkit.recipes.finetune import finetune

    data = write_jsonl(tmp_path / "toy.jsonl", TOY + [{"instruction": "colour of milk", "output": "white " * 12}])
    common = ["method=full", "data.seq_len=96", "train.batch_size=4", "train.steps=3", "data.val_fraction=0",
              "optim.lr=1e-2", "optim.warmup_steps=1"]
    for name, micro in (("whole", 4), ("split", 1)):
        finetune(ft_cfg(data, tmp_path / name, *common, f"train.micro_batch_size={micro}"), model=tiny(),
                 tokenizer=tok, quiet=True)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert len(a) == 3 and max(abs(x[1] - y[1]) for x, y in zip(a, b)) < 1e-5
