"""DPO and IPO: the losses against their closed forms and trl's DPOTrainer, the adapter-off reference,
the recipe on a tiny random model, resume, NaN handling and `llmkit align`."""

import collections
import json
import math
import types

import pytest
import torch
from _shared import byte_chat_tokenizer

from llmkit.errors import LLMKitError
from llmkit.losses import dpo_loss, ipo_loss
from llmkit.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=256))


# prompts whose preferred answer is upper case: a preference a tiny model can pick up in a few steps
WORDS = ["apple", "river", "stone", "cloud", "green", "house", "light", "north", "bread", "chair", "music", "paper"]
PAIRS = [{"prompt": f"say {w}", "chosen": w.upper(), "rejected": w} for w in WORDS]
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                              {"from": "human", "value": "name a colour"}],
            "chosen": {"from": "gpt", "value": "BLUE"}, "rejected": {"from": "gpt", "value": "blue"}}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_cfg(data, out, *over):
    from llmkit.config import load_config
    from llmkit.recipes.dpo import DPOConfig

    return load_config(DPOConfig, None, ["model=tiny", f"data.files=[{data}]", f"train.out_dir={out}",
                                         "train.threads=1", "train.device=cpu", "data.seq_len=64", *over])


# ---------------------------------------------------------------- the losses
def test_dpo_loss_is_ln2_at_the_reference_and_matches_the_closed_form():
    torch.manual_seed(0)
    lp = -torch.rand(4, 6, dtype=torch.float64) * 40
    pc, pr = lp[0], lp[1]
    loss, m = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3, label_smoothing=0.1)
    assert loss.item() == math.log(2) and m["reward_accuracy"] == 0 and m["reward_margin"] == 0
    beta, eps = 0.2, 0.15
    loss, m = dpo_loss(*lp, beta=beta, label_smoothing=eps)
    want = []
    for a, b, c, d in zip(*lp.tolist()):
        z = beta * ((a - c) - (b - d))
        want.append(-(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z))))
    assert abs(loss.item() - sum(want) / len(want)) < 1e-12
    assert abs(m["reward_chosen"].item() - beta * (lp[0] - lp[2]).mean().item()) < 1e-12
    loss, _ = ipo_loss(*lp, beta=beta)
    want = (((lp[0] - lp[2]) - (lp[1] - lp[3]) - 1 / (2 * beta)) ** 2).mean()
    assert abs(loss.item() - want.item()) < 1e-12


def trl_loss(loss_type, pc, pr, rc, rr, n_c, n_r, beta, eps=0.0):
    """trl's own loss code (DPOTrainer._compute_loss, trl 1.16) run on given sequence log-probs: a
    stand-in model returns per-token log-probs that sum to them over completion masks of n tokens,
    and a minimal `self` holds the attributes the method reads (no trainer, model or dataset built)."""
    trl = pytest.importorskip("trl")
    B = pc.numel()
    T = int(max(n_c.max(), n_r.max())) + 1
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(torch.cat([n_c, n_r]).tolist()):
        mask[i, T - n:] = 1
    per_tok = mask[:, 1:].double() * (torch.cat([pc, pr]) / mask[:, 1:].sum(1))[:, None]  # (2B, T-1)
    zeros = torch.zeros(2 * B, T - 1)
    outputs = types.SimpleNamespace(log_probs=per_tok, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    acc = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                                unwrap_model=lambda m: m)
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trl.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_equal_trl(beta):
    torch.manual_seed(1)
    B = 6
    pc, pr, rc, rr = (-torch.rand(B, dtype=torch.float64) * 60 for _ in range(4))
    n_c, n_r = torch.randint(1, 40, (B,)), torch.randint(1, 40, (B,))
    ours, m = dpo_loss(pc, pr, rc, rr, beta)
    theirs, tm = trl_loss("sigmoid", pc, pr, rc, rr, n_c, n_r, beta)
    assert abs(ours.item() - theirs) < 1e-6
    for a, b in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                 ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")]:
        assert abs(float(m[a]) - tm[b]) < 1e-6, a
    # IPO on per-token means (trl divides the summed log-ratios by each completion's length)
    ours, _ = ipo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta)
    theirs, _ = trl_loss("ipo", pc, pr, rc, rr, n_c, n_r, beta)
    assert abs(ours.item() - theirs) < 1e-6 * max(1.0, theirs)
    # conservative DPO: trl 1.16's "sigmoid" no longer smooths labels; its "aot" loss is the same
    # smoothed logistic loss on sorted log-ratios, which for one pair is exactly cDPO
    for i in range(B):
        s = slice(i, i + 1)
        ours, _ = dpo_loss(pc[s], pr[s], rc[s], rr[s], beta, label_smoothing=0.2)
        theirs, _ = trl_loss("aot", pc[s], pr[s], rc[s], rr[s], n_c[s], n_r[s], beta, eps=0.2)
        assert abs(ours.item() - theirs) < 1e-6


# ---------------------------------------------------------------- data and the reference
def test_preference_batch_masks_the_prompt(tmp_path, tok):
    from llmkit.align.data import load_preference_data, preference_batch

    data = load_preference_data([str(write_jsonl(tmp_path / "p.jsonl", PAIRS[:3] + [SHAREGPT]))], tok, 128, 0.0)
    assert len(data.train) == 4 and not data.val
    b = preference_batch(data.train, pad_id=0)
    assert b["idx"].shape == b["targets"].shape and b["idx"].shape[0] == 8
    for row, (p, c, r) in zip(range(4), data.train):
        for k, resp in ((row, c), (row + 4, r)):
            scored = [int(x) for x in b["targets"][k] if x != -100]
            assert scored == resp and tok.decode(resp).endswith("<|im_end|>\n")
            assert b["idx"][k, :len(p)].tolist() == p  # the prompt is the input, never a target
    with pytest.raises(LLMKitError, match="identical"):
        load_preference_data([str(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "chosen": "b",
                                                                         "rejected": "b"}]))], tok, 64)
    with pytest.raises(LLMKitError, match="no 'rejected'"):
        load_preference_data([str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}]))], tok, 64)


def test_disabled_adapter_is_the_base_model():
    from llmkit.peft import apply_lora, apply_adapters, can_disable, disabled
    from llmkit.losses import sequence_logprobs

    x = torch.randint(0, 256, (2, 12))
    y = torch.randint(0, 256, (2, 12))
    base = tiny()
    with torch.no_grad():
        want = sequence_logprobs(base, x, y)
    for apply in (lambda m: apply_lora(m, r=4, targets=["q_proj", "v_proj", "up_proj"]),
                  lambda m: apply_adapters(m, bottleneck=8)):
        model = apply(tiny())
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)  # a trained adapter: the model is no longer its base
            trained = sequence_logprobs(model, x, y)
            assert (trained - want).abs().max() > 1e-2
            with disabled(model):
                assert torch.equal(sequence_logprobs(model, x, y), want)
            assert torch.equal(sequence_logprobs(model, x, y), trained)  # switched back on
    assert not can_disable(tiny())
    with pytest.raises(LLMKitError, match="no adapter"):
        with disabled(tiny()):
            pass


# ---------------------------------------------------------------- the recipe
def test_dpo_with_lora_learns_the_preference(tmp_path, tok):
    from llmkit.peft import load_adapter
    from llmkit.recipes.dpo import OBJECTIVES, evaluate_pairs, preference_loss
    from llmkit.align.data import load_preference_data
    from llmkit.recipes.dpo import train_dpo
    from functools import partial

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = dpo_cfg(data, tmp_path / "out", "train.steps=12", "train.batch_size=4", "optim.lr=2e-2",
                  "optim.warmup_steps=1", "data.val_fraction=0", "beta=0.5", "lora.r=4",
                  "lora.targets=[q_proj,v_proj,up_proj,down_proj]")
    model = tiny()
    s = train_dpo(cfg, model=model, tokenizer=tok, quiet=True)
    assert s["reference"] == "adapter"
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert abs(recs[0]["loss"] - math.log(2)) < 1e-6 and recs[0]["reward_accuracy"] == 0  # step 1: policy = ref
    assert (tmp_path / "out" / "loss.png").exists() and (tmp_path / "out" / "rewards.png").exists()
    # on every training pair: the reloaded adapter against the base model as a separate copy
    pairs = load_preference_data([str(data)], tok, 64, 0.0).train
    policy = load_adapter(tiny(), tmp_path / "out").eval()
    fn = partial(preference_loss, objective=OBJECTIVES["dpo"], beta=0.5)
    m = evaluate_pairs(policy, fn, pairs, None, 4, 0, "cpu")
    assert m["val_reward_accuracy"] >= 0.9 and m["val_reward_margin"] > 0.5 and m["val_loss"] < 0.5, m
    with torch.no_grad():  # the adapter-off reference is the base model, so the same with a copy precomputed
        from llmkit.recipes.dpo import precompute_reference

        ref = precompute_reference(tiny(), pairs, 4, 0, "cpu")
    m2 = evaluate_pairs(policy, fn, pairs, ref, 4, 0, "cpu")
    assert all(abs(m[k] - m2[k]) < 1e-5 for k in m)


def test_ipo_full_weights_precomputed_reference(tmp_path, tok):
    from llmkit.checkpoint import load_checkpoint
    from llmkit.recipes.dpo import train_dpo

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = dpo_cfg(data, tmp_path / "full", "loss_type=ipo", "peft=full", "train.steps=4", "train.batch_size=4",
                  "optim.lr=1e-3", "optim.warmup_steps=1", "data.val_fraction=0.25", "beta=0.5",
                  "train.eval_every=4")
    s = train_dpo(cfg, model=tiny(), tokenizer=tok, quiet=True)
    assert s["reference"] == "precomputed"
    assert abs(s["val_before"]["val_loss"] - 1.0) < 1e-9  # (0 - 1/(2·0.5))² at policy = reference
    assert s["val_after"]["val_loss"] < s["val_before"]["val_loss"]
    load_checkpoint(tmp_path / "full")  # a full checkpoint, accepted by --model
    with pytest.raises(LLMKitError, match="reference=adapter"):
        train_dpo(dpo_cfg(data, tmp_path / "x", "peft=full", "reference=adapter"), model=tiny(), tokenizer=tok,
                  quiet=True)


def test_resume_and_nan_keep_the_last_good_checkpoint(tmp_path, tok, monkeypatch):
    import llmkit.recipes.dpo as rd
    from llmkit.train import checkpoint as ckpt

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    common = ["train.steps=5", "train.batch_size=2", "train.ckpt_every=2", "optim.lr=1e-2", "data.val_fraction=0.25",
              "train.eval_every=3", "lora.dropout=0.2"]
    ref = rd.train_dpo(dpo_cfg(data, tmp_path / "ref", *common), model=tiny(), tokenizer=tok, quiet=True)

    real, calls = rd.train_step, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        stats = real(*a, **k)
        return {**stats, "loss": float("nan")} if len(calls) == 3 else stats

    monkeypatch.setattr(rd, "train_step", nan_at_step_3)
    with pytest.raises(LLMKitError, match=r"loss became nan.* at step 3; the last good checkpoint .*step_00000002"):
        rd.train_dpo(dpo_cfg(data, tmp_path / "cut", *common), model=tiny(), tokenizer=tok, quiet=True)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut.partial" / "checkpoints")] == ["step_00000002"]
    s = rd.train_dpo(dpo_cfg(data, tmp_path / "cut", *common), model=tiny(), tokenizer=tok, quiet=True, resume=True)
    a = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for k in ("loss", "reward_margin", "val_loss", "val_reward_accuracy"):
            assert (k in x) == (k in y) and abs(x.get(k, 0) - y.get(k, 0)) < 1e-6, (k, x, y)
    assert a[-1]["loss"] < a[1]["loss"]  # it trained
    assert abs(s["val_after"]["val_loss"] - ref["val_after"]["val_loss"]) < 1e-6


def test_cli_align(tmp_path, tok, capsys):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main
    from llmkit.peft import load_adapter

    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS + [SHAREGPT])
    args = ["align", "--model", str(tmp_path / "base"), "--data", str(data), "--device", "cpu",
            "train.steps=2", "train.batch_size=2", "data.seq_len=64", "train.threads=1", "train.progress=false"]
    assert main(args + ["--method", "ipo", "--out", str(tmp_path / "ipo")]) == 0
    out = capsys.readouterr().out
    assert "ipo with lora (reference: adapter)" in out and "held-out" in out
    load_adapter(tiny(), tmp_path / "ipo")  # the output is an adapter for --adapter
    assert main(args + ["--method", "ipo", "--out", str(tmp_path / "ipo")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--method", "dpo", "--out", str(tmp_path / "d"), "beta=0"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    assert main(args + ["--method", "dpo", "--out", str(tmp_path / "d"), "--reward-model", "x"]) == 2
    assert "--reward-model is not used by --method dpo" in capsys.readouterr().err
    assert main(args + ["--method", "dpo", "--out", str(tmp_path / "d"), "loss_typ=ipo"]) == 2
    assert "loss_typ" in capsys.readouterr().err
    assert main(["align", "--method", "dpo", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "d")]) == 2
    assert "no data given" in capsys.readouterr().err
