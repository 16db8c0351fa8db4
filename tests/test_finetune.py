"""SFT data (formats, completion-only labels, packing, mixing), the fine-tuning recipe and the CLI."""

import json

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.finetune.data import (IGNORE, document_mask, Example, example_stream, load_sft_data, packed_batch,
                                  read_records, to_messages, tokenize_chat)
from llmkit.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers

    from llmkit.tokenizer import Tokenizer, bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    hf = HFT(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(hf, eos_token="<|im_end|>")  # no template: ChatML


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
    from llmkit.recipes.finetune import FinetuneConfig, finetune, sft_logits

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
    cfg = FinetuneConfig(model="tiny", data=[str(data)], method="prompt", out=str(tmp_path / "p"), seq_len=512,
                         batch_size=2, max_steps=1, val_fraction=0.34, threads=1)
    cfg.prompt.n_tokens = 3
    with pytest.raises(LLMKitError, match=r"seq_len 512 does not fit the 509 tokens .* set seq_len <= 509"):
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


def test_tiny_model_learns_toy_instructions(tmp_path, tok):
    from llmkit.peft import load_adapter
    from llmkit.recipes.finetune import FinetuneConfig, finetune, sft_logits

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = FinetuneConfig(model="tiny", data=[str(data)], method="full", out=str(tmp_path / "full"), seq_len=96,
                         batch_size=6, max_steps=60, lr=1e-2, warmup_steps=5, val_fraction=0.0, threads=1)
    s = finetune(cfg, model=tiny(), tokenizer=tok, quiet=True)
    model, _ = __import__("llmkit.checkpoint", fromlist=["x"]).load_checkpoint(tmp_path / "full")
    correct = sum(answer(model, tok, r["instruction"]) == r["output"] for r in TOY)
    assert correct >= 5, [answer(model, tok, r["instruction"]) for r in TOY]
    assert (tmp_path / "full" / "metrics.jsonl").exists() and (tmp_path / "full" / "loss.png").exists()
    assert s["trainable_share"] == 1.0

    # LoRA on the learned model, packed: loss goes down, the adapter reloads to the same outputs
    recs = [{"instruction": r["instruction"], "output": r["output"].upper()} for r in TOY]
    data2 = write_jsonl(tmp_path / "upper.jsonl", recs)
    cfg = FinetuneConfig(model="tiny", data=[str(data2)], method="lora", out=str(tmp_path / "lora"), seq_len=96,
                         batch_size=2, max_steps=20, lr=1e-2, warmup_steps=2, val_fraction=0.34, packing=True,
                         eval_every=20, threads=1)
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
    from llmkit.recipes.finetune import FinetuneConfig, finetune, sft_logits

    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    cfg = FinetuneConfig(model="tiny", data=[str(data)], method=method, out=str(tmp_path / method), seq_len=64,
                         batch_size=2, max_steps=2, val_fraction=0.34, threads=1)
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
            "--out", str(tmp_path / "ad"), "max_steps=2", "batch_size=2", "seq_len=64", "lr=5e-5"]
    assert main(args + ["lora.r=2"]) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["lora.r=0", "--force"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(args + ["lora.targets=[q_proj,nope]", "--force"]) == 2
    assert "'nope' does not exist" in capsys.readouterr().err
    assert main(args[:7] + ["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "ad2"), "max_steps=1",
                            "batch_size=2", "seq_len=64"]) == 0
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_checkpoint(tmp_path / "merged")
    adapted = load_adapter(load_checkpoint(tmp_path / "base")[0], tmp_path / "ad")
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() < 1e-5
