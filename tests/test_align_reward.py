"""Reward model: Bradley-Terry loss against TRL, HF sequence-classification parity both ways, LoRA on the RM."""

import json
import types
from collections import defaultdict

import pytest
import torch
from _shared import byte_chat_tokenizer

from llmkit.align.reward import (RewardModel, apply_method, last_token_index, load_reward_model, reward_model_from,
                                 save_reward_model)
from llmkit.errors import LLMKitError
from llmkit.losses import bradley_terry_loss

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PAD = 0
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _causal(family):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {"llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False)),
            "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=128))}[family]()


def padded_batch(seed=0, lengths=(9, 5, 12, 1)):
    """Right-padded rows of random non-pad tokens (B, T)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((len(lengths), max(lengths)), PAD)
    for b, n in enumerate(lengths):
        idx[b, :n] = torch.randint(1, 128, (n,), generator=g)
    return idx


def tiny_rm(family, tmp_path, seed=0) -> RewardModel:
    from llmkit.checkpoint import load_hf_model

    torch.manual_seed(seed)
    d = tmp_path / f"{family}-lm"
    _causal(family).save_pretrained(d)
    return reward_model_from(load_hf_model(d), pad_id=PAD).eval()


def trl_compute_loss(r_chosen, r_rejected):
    """TRL's RewardTrainer.compute_loss on the given rewards (a stand-in model returns them as logits)."""
    from trl import RewardTrainer

    logits = torch.cat([r_chosen, r_rejected])[:, None]
    fake = types.SimpleNamespace(model=types.SimpleNamespace(training=False),
                                 args=types.SimpleNamespace(center_rewards_coefficient=None),
                                 accelerator=types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                                 _metrics={"eval": defaultdict(list)}, _total_train_tokens=0)
    loss = RewardTrainer.compute_loss(fake, lambda **kw: types.SimpleNamespace(logits=logits), {})
    return loss, fake._metrics["eval"]


def test_bradley_terry_equals_trl_and_the_closed_form():
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    loss, m = bradley_terry_loss(rc, rr)
    want, trl_metrics = trl_compute_loss(rc, rr)
    assert abs(float(loss) - float(want)) < 1e-6
    assert abs(float(m["accuracy"]) - trl_metrics["accuracy"][0]) < 1e-6
    assert abs(float(m["margin"]) - trl_metrics["margin"][0]) < 1e-6
    closed = sum(torch.log1p(torch.exp(-(a - b))) for a, b in zip(rc.double(), rr.double())) / 16
    assert abs(float(loss) - float(closed)) < 1e-6
    # equal rewards: ln 2, accuracy 0; gradient wrt r_c is -sigma(r_r - r_c) / B
    z = torch.zeros(4, requires_grad=True)
    loss, m = bradley_terry_loss(z, torch.zeros(4))
    loss.backward()
    assert abs(loss.item() - 0.6931471805599453) < 1e-7 and float(m["accuracy"]) == 0
    assert torch.allclose(z.grad, torch.full((4,), -0.5 / 4))


def test_last_token_index_is_the_rightmost_non_pad():
    idx = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [0, 0, 0, 0], [1, 0, 2, 0]])
    assert last_token_index(idx, 0).tolist() == [1, 3, 0, 2]
    assert last_token_index(idx, None).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_saved_rm_loads_in_transformers_with_the_same_rewards(tmp_path, family):
    from transformers import AutoModelForSequenceClassification

    rm = tiny_rm(family, tmp_path)
    out = save_reward_model(rm, tmp_path / "rm", meta={"test": True})
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    assert type(hf).__name__.endswith("ForSequenceClassification")
    idx = padded_batch()
    with torch.no_grad():
        ours = rm(idx)
        theirs = hf(input_ids=idx, attention_mask=(idx != PAD).long()).logits.squeeze(-1)
        assert ours.shape == (4,)
        assert torch.allclose(ours, theirs, atol=TOL), (ours, theirs)
        # padding does not change a row's reward
        alone = torch.stack([rm(idx[b:b + 1, :int((idx[b] != PAD).sum())])[0] for b in range(4)])
        assert torch.allclose(ours, alone, atol=TOL)
        back, _ = load_reward_model(out)
        assert torch.allclose(back(idx), ours, atol=1e-6)


def test_rm_written_by_transformers_loads_into_llmkit(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    hf = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=1, pad_token_id=PAD)).eval()
    torch.nn.init.normal_(hf.score.weight, std=0.5)
    hf.save_pretrained(tmp_path / "hf-rm")
    rm, tok = load_reward_model(tmp_path / "hf-rm")
    assert tok is None and rm.pad_id == PAD
    idx = padded_batch(seed=3)
    with torch.no_grad():
        assert torch.allclose(rm(idx), hf(input_ids=idx, attention_mask=(idx != PAD).long()).logits.squeeze(-1),
                              atol=TOL)


def test_not_a_reward_model(tmp_path):
    _causal("llama").save_pretrained(tmp_path / "lm")
    with pytest.raises(LLMKitError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=3, pad_token_id=0)).save_pretrained(tmp_path / "c")
    with pytest.raises(LLMKitError, match="num_labels=3"):
        load_reward_model(tmp_path / "c")


def test_lora_on_the_backbone_trains_the_head_too_and_merges_for_saving(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from llmkit.peft import default_sections, unload
    from llmkit.train.loop import train_step

    rm = tiny_rm("llama", tmp_path)
    apply_method(rm, "lora", default_sections("lora"))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    rm.train()
    head_before = rm.score.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    idx = padded_batch(lengths=(6, 8, 7, 5))

    def loss_fn(model, batch):
        r = model(batch["idx"])
        return bradley_terry_loss(r[:2], r[2:])

    for _ in range(3):
        train_step(rm, opt, [{"idx": idx}], loss_fn=loss_fn)
    assert not torch.equal(rm.score.weight, head_before)
    assert any(float(m.lora_B.weight.abs().sum()) > 0 for m in rm.modules() if hasattr(m, "lora_B"))
    rm.eval()
    with torch.no_grad():
        before = rm(idx)
        with pytest.raises(LLMKitError, match="merge it"):
            save_reward_model(rm, tmp_path / "x")
        unload(rm.model, merge=True)
        assert torch.allclose(rm(idx), before, atol=1e-5)
        save_reward_model(rm, tmp_path / "merged")
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert torch.allclose(hf(input_ids=idx).logits.squeeze(-1), before, atol=TOL)


# ------------------------------------------------------------------ the recipe and the CLI
@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()  # ChatML; pad = eos = <|im_end|> (257)


def toy_pairs(path, n=24):
    """A preference a tiny RM learns in a few steps: polite replies beat rude ones."""
    rows = [{"prompt": f"can you help with task {i}?", "chosen": f"sure, happy to help {i}",
             "rejected": f"no. go away {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_policy(tok, seed=0):
    from llmkit.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=256))


def rm_cfg(data, out, *over):
    from llmkit.config import load_config
    from llmkit.recipes.reward import RewardConfig

    return load_config(RewardConfig, None, ["model=tiny", f"data.files=[{data}]", f"train.out_dir={out}",
                                            "train.threads=1", "train.device=cpu", "data.seq_len=96",
                                            "train.batch_size=4", "data.val_fraction=0.25", "optim.lr=1e-2",
                                            "optim.warmup_steps=0", *over])


def test_recipe_learns_a_toy_preference_and_writes_an_hf_rm(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    from llmkit.align.data import load_preference_data, preference_batch
    from llmkit.recipes.reward import train_reward

    data = toy_pairs(tmp_path / "pairs.jsonl")
    s = train_reward(rm_cfg(data, tmp_path / "rm", "train.steps=12", "train.eval_every=6"),
                     model=reward_model_from(tiny_policy(tok), tok), tokenizer=tok, quiet=True)
    assert s["val_pairs"] == 6 and s["train_pairs"] == 18
    assert s["val_accuracy_after"] == 1.0 and s["val_loss_after"] < s["val_loss_before"]
    out = tmp_path / "rm"
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "reward.json"} <= {
        p.name for p in out.iterdir()}
    assert not (tmp_path / "rm.partial").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "val_accuracy" in recs[0] and recs[-1]["step"] == 12
    # the written RM (LoRA merged) gives transformers the rewards llmkit gives
    rm, rm_tok = load_reward_model(out)
    pairs = load_preference_data(str(data), rm_tok, 96, 0.25, 0).val
    b = preference_batch(pairs, rm.pad_id)
    idx = b["idx"]
    # pad = eos = <|im_end|> also ends every turn: the attention mask comes from the lengths, as a tokenizer's
    # padding gives it; the reward is read at the final "\n" by both (the rightmost non-pad token)
    mask = (torch.arange(idx.size(1))[None] < b["lengths"][:, None]).long()
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        r = rm(idx)
        assert torch.allclose(hf(input_ids=idx, attention_mask=mask).logits.squeeze(-1), r, atol=TOL)
    assert bool((r[:6] > r[6:]).all())


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tok, monkeypatch):
    import llmkit.recipes.reward as rr
    from llmkit.recipes.reward import train_reward
    from llmkit.train import checkpoint as ckpt

    class Cut(Exception):
        pass

    data = toy_pairs(tmp_path / "pairs.jsonl")
    common = ["train.steps=6", "train.ckpt_every=2", "train.eval_every=3", "lora.dropout=0.2",
              "train.micro_batch_size=2"]
    ref = train_reward(rm_cfg(data, tmp_path / "ref", *common), model=reward_model_from(tiny_policy(tok), tok),
                       tokenizer=tok, quiet=True)
    real, calls = rr.train_step, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise Cut
        return real(*a, **k)

    monkeypatch.setattr(rr, "train_step", dies_at_step_5)
    with pytest.raises(Cut):
        train_reward(rm_cfg(data, tmp_path / "cut", *common), model=reward_model_from(tiny_policy(tok), tok),
                     tokenizer=tok, quiet=True)
    monkeypatch.undo()
    left = ckpt.list_checkpoints(tmp_path / "cut.partial" / "checkpoints")
    assert [p.name for p in left] == ["step_00000002", "step_00000004"]
    with pytest.raises(LLMKitError, match="interrupted run"):
        train_reward(rm_cfg(data, tmp_path / "cut", *common), model=reward_model_from(tiny_policy(tok), tok),
                     tokenizer=tok, quiet=True)
    s = train_reward(rm_cfg(data, tmp_path / "cut", *common), model=reward_model_from(tiny_policy(tok), tok),
                     tokenizer=tok, quiet=True, resume=True)
    a = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 7
    for x, y in zip(a, b):
        x, y = json.loads(x), json.loads(y)
        for k in ("loss", "val_loss", "val_accuracy", "accuracy"):
            assert (k in x) == (k in y) and abs(x.get(k, 0) - y.get(k, 0)) < 1e-6
    assert abs(s["val_loss_after"] - ref["val_loss_after"]) < 1e-6


def test_config_refuses_methods_that_do_not_merge(tmp_path):
    from llmkit.recipes.reward import train_reward

    with pytest.raises(LLMKitError, match="cannot be folded"):
        train_reward(rm_cfg(tmp_path / "x.jsonl", tmp_path / "o", "method=prompt"))


def test_cli_align_rm_then_llmkit_reward(tmp_path, tok, capsys):
    """`llmkit align --method rm` on an llmkit checkpoint, then `llmkit reward` on both kinds of rows."""
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    save_checkpoint(tiny_policy(tok), tmp_path / "policy", tokenizer=tok)
    data = toy_pairs(tmp_path / "pairs.jsonl")
    rc = main(["align", "--method", "rm", "--model", str(tmp_path / "policy"), "--data", str(data),
               "--out", str(tmp_path / "rm"), "train.steps=10", "train.batch_size=4", "optim.lr=1e-2",
               "optim.warmup_steps=0", "data.seq_len=96", "data.val_fraction=0.25", "train.progress=false",
               "train.device=cpu"])
    assert rc == 0 and "held-out accuracy" in capsys.readouterr().out
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "can you help with task 3?", "response": "sure, happy to help 3"}) + "\n"
                    + json.dumps({"prompt": "can you help with task 5?", "chosen": "sure, happy to help 5",
                                  "rejected": "no. go away 5"}) + "\n")
    assert main(["reward", "--model", str(tmp_path / "rm"), "--input", str(rows), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in res["results"]] == [["reward", "row"], ["chosen", "margin", "rejected", "row"]]
    rm, rm_tok = load_reward_model(tmp_path / "rm")
    from llmkit.align.data import tokenize_pair
    from llmkit.align.reward import score_batches

    p, c, _ = tokenize_pair(rm_tok, [{"role": "user", "content": "can you help with task 3?"}],
                            "sure, happy to help 3", "x")
    assert abs(res["results"][0]["reward"] - score_batches(rm, [p + c])[0]) < 1e-5
    assert res["summary"]["preference_rows"] == 1
    assert main(["reward", "--model", str(tmp_path / "rm"), "--input", str(rows)]) == 0
    assert "margin" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    assert main(["reward", "--model", str(tmp_path / "rm"), "--input", str(bad)]) == 2
    assert f"{bad}:1: record has no 'rejected'" in capsys.readouterr().err
    assert main(["reward", "--model", str(tmp_path / "policy"), "--input", str(rows)]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_tokenizer_mismatch_is_one_line(tok):
    from llmkit.align.reward import check_same_tokenizer
    from llmkit.tokenizer import Tokenizer

    check_same_tokenizer(tok, tok)
    from tokenizers import Tokenizer as HFT
    from tokenizers import models

    other = Tokenizer(HFT(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(LLMKitError, match="tokenizer differs from the policy's") as e:
        check_same_tokenizer(other, tok)
    assert "\n" not in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok, monkeypatch):
    import llmkit.recipes.reward as rr
    from llmkit.recipes.reward import train_reward
    from llmkit.train import checkpoint as ckpt

    data = toy_pairs(tmp_path / "pairs.jsonl")
    real, calls = rr.train_step, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        stats = real(*a, **k)
        return {**stats, "loss": float("nan")} if len(calls) == 3 else stats

    monkeypatch.setattr(rr, "train_step", nan_at_step_3)
    with pytest.raises(LLMKitError, match="loss became nan at step 3; the last good checkpoint .*step_00000002") as e:
        train_reward(rm_cfg(data, tmp_path / "o", "train.steps=6", "train.ckpt_every=2"),
                     model=reward_model_from(tiny_policy(tok), tok), tokenizer=tok, quiet=True)
    assert "\n" not in str(e.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "o.partial" / "checkpoints")] == ["step_00000002"]
    assert not (tmp_path / "o").exists()
