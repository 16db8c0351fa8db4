"""The shared RL loop (recipes/rl.py) on a tiny random model and the toy task: PPO scored by a reward model,
the adaptive KL controller, exact resume from step checkpoints and the stop on a non-finite reward or loss
(GRPO and PPO)."""

import json

import pytest
import torch
from _shared import byte_chat_tokenizer
from _shared import tiny_llama
from safetensors.torch import load_file

from llmkit.errors import LLMKitError
from llmkit.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def tiny(seed=0):
    return tiny_llama(seed, vocab_size=258)  # the byte tokenizer's size: a trained policy samples no unknown id


def digits(c, ex):  # a random model earns no correctness reward: one that varies within groups
    return float(sum(ch.isdigit() for ch in c))


def rl_cfg(kind, out, *over):
    from llmkit.config import load_config
    from llmkit.recipes.grpo import GRPOConfig
    from llmkit.recipes.ppo import PPOConfig

    cls = {"grpo": GRPOConfig, "ppo": PPOConfig}[kind]
    base = ["model=tiny", f"train.out_dir={out}", "train.steps=4", "train.batch_size=4", "train.micro_batch_size=2",
            f"{kind}.group_size=2", f"{kind}.prompts_per_step=2", f"{kind}.max_new_tokens=6", f"{kind}.epochs=2",
            "data.toy_size=30", "data.val_prompts=2", "optim.lr=3e-3", "train.progress=false", "train.ckpt_every=1",
            "train.keep_last=5"]
    cfg = load_config(cls, None, base + list(over))
    cfg.data.files, cfg.data.system = ["toy-arithmetic"], None
    return cfg


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- adaptive KL
def test_adaptive_kl_coef_closed_form():
    from llmkit.recipes.ppo import adaptive_kl_coef

    for beta, kl, target, horizon, n in [(0.1, 6.0, 6.0, 10000, 64), (0.1, 9.0, 6.0, 10000, 64),
                                         (0.2, 3.0, 6.0, 1000, 16), (0.05, 100.0, 1.0, 500, 32),
                                         (0.05, 0.0, 1.0, 500, 32)]:
        err = min(max(kl / target - 1, -0.2), 0.2)  # Ziegler et al. 2019: e_t clipped to [-0.2, 0.2]
        assert adaptive_kl_coef(beta, kl, target, horizon, n) == pytest.approx(beta * (1 + err * n / horizon), rel=1e-12)
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 100, 10) == pytest.approx(0.1 * 1.02)  # over target: β grows, clipped
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 100, 10) == pytest.approx(0.1 * 0.98)  # under target: β shrinks


# ---------------------------------------------------------------- PPO against a reward model
def save_rm(tok, path, seed=5, tokenizer=None):
    from llmkit.align.reward import reward_model_from, save_reward_model

    rm = reward_model_from(tiny(seed), tok)
    save_reward_model(rm, path, tokenizer=tokenizer or tok)
    return rm


def test_reward_model_reward_scores_prompt_and_completion(tmp_path, tok):
    from llmkit.align.data import tokenize_pair
    from llmkit.align.rewards import get_rewards

    rm = save_rm(tok, tmp_path / "rm").eval()
    fns = get_rewards("rm,format", reward_model=str(tmp_path / "rm"), tokenizer=tok, batch_size=2)
    rows = [{"question": "2+2?", "answer": None}, {"question": "q", "answer": None,
                                                   "messages": [{"role": "user", "content": "hi"}]}]
    got = fns["rm"].score_batch(["four", "hello there"], rows)
    for (c, msgs), g in zip([("four", [{"role": "user", "content": "2+2?"}]),
                             ("hello there", [{"role": "user", "content": "hi"}])], got):
        p, reply, _ = tokenize_pair(tok, msgs, c, c)  # the layout the RM was trained on
        with torch.no_grad():
            assert g == pytest.approx(float(rm(torch.tensor([p + reply]))), abs=1e-5)
    assert fns["rm"]("four", rows[0]) == pytest.approx(got[0], abs=1e-5)
    assert not any(p.requires_grad for p in fns["rm"].rm.parameters())  # frozen


def test_ppo_with_a_reward_model_from_preference_prompts(tmp_path, tok, capsys):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    save_rm(tok, tmp_path / "rm")
    prefs = tmp_path / "prefs.jsonl"  # the prompt side of preference records (HH transcripts, plain pairs)
    rows = [{"chosen": f"\n\nHuman: say {i}\n\nAssistant: {i}", "rejected": f"\n\nHuman: say {i}\n\nAssistant: no"}
            for i in range(8)] + [{"prompt": f"count to {i}", "chosen": "1 2", "rejected": "x"} for i in range(4)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["align", "--method", "ppo", "--model", str(tmp_path / "base"), "--reward-model", str(tmp_path / "rm"),
            "--data", str(prefs), "--out", str(tmp_path / "out"), "train.steps=2", "train.batch_size=4",
            "ppo.group_size=2", "ppo.prompts_per_step=2", "ppo.max_new_tokens=5", "ppo.epochs=1",
            "data.val_prompts=2", "data.system=null", "data.prefill=", "ppo.kl_target=0.5", "ppo.kl_horizon=10",
            "train.progress=false"]
    assert main(args) == 0, capsys.readouterr().err
    assert "held-out rm" in capsys.readouterr().out
    recs = records(tmp_path / "out" / "metrics.jsonl")
    train = [r for r in recs if "reward" in r]
    for r in train:
        for k in ("reward_rm", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss", "response_len"):
            assert k in r and abs(r[k]) < 1e6, k
        assert r["reward"] == r["reward_rm"]
    assert train[0]["kl_coef"] == 0.05 and train[1]["kl_coef"] != 0.05  # adapted after the first rollout
    summary = json.loads((tmp_path / "out" / "ppo.json").read_text())["summary"]
    assert summary["reward_model"] == str(tmp_path / "rm") and summary["kl_coef"] != train[1]["kl_coef"]
    assert (tmp_path / "out" / "value_head.safetensors").is_file()

    # rewards=rm without a reward model, a reward model no reward uses, and an RM of another tokenizer
    bad = args[:5] + args[7:9] + ["--out", str(tmp_path / "x")] + args[11:]
    assert main(bad + ["ppo.rewards=rm"]) == 2 and "give --reward-model" in capsys.readouterr().err
    assert main(args[:9] + ["--out", str(tmp_path / "x")] + args[11:] + ["ppo.rewards=format"]) == 2
    assert "does not use it" in capsys.readouterr().err
    from tokenizers import Tokenizer as HFT
    from tokenizers import models

    from llmkit.tokenizer import Tokenizer

    other = Tokenizer(HFT(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")))
    save_rm(tok, tmp_path / "rm2", tokenizer=other)
    args2 = args[:5] + ["--reward-model", str(tmp_path / "rm2")] + args[7:9] + ["--out", str(tmp_path / "y")] + args[11:]
    assert main(args2) == 2
    err = capsys.readouterr().err
    assert "tokenizer differs from the policy's" in err and err.count("\n") == 1
    assert not (tmp_path / "y.partial").exists() and not (tmp_path / "y").exists()  # nothing done


# ---------------------------------------------------------------- exact resume and NaN safety
class NaNAt:
    """A batched reward (digits) that returns NaN on its `at`-th batch call (1: the evaluation before training,
    then one call per iteration)."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0

    def score_batch(self, completions, examples):
        self.calls += 1
        return [float("nan") if self.calls == self.at else digits(c, e) for c, e in zip(completions, examples)]


def adapter_tensors(out):
    return {**load_file(str(out / "adapter_model.safetensors")),
            **({f"v.{k}": v for k, v in load_file(str(out / "value_head.safetensors")).items()}
               if (out / "value_head.safetensors").is_file() else {})}


def assert_same_run(a_dir, b_dir):
    a, b = records(a_dir / "metrics.jsonl"), records(b_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k != "elapsed_s":
                assert abs(x[k] - y[k]) <= 1e-6, (k, x, y)
    ta, tb = adapter_tensors(a_dir), adapter_tensors(b_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_grpo_nan_reward_stops_keeps_the_good_checkpoint_and_resumes_exactly(tmp_path, tok):
    from llmkit.recipes.grpo import grpo

    grpo(rl_cfg("grpo", tmp_path / "ref"), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": NaNAt()})
    with pytest.raises(LLMKitError, match=r"reward d became nan at iteration 3, completion 0; the last good "
                                          r"checkpoint .*step_00000002 is kept") as e:
        grpo(rl_cfg("grpo", tmp_path / "cut"), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": NaNAt(at=4)})
    assert "\n" not in str(e.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut.partial" / "checkpoints")] == [
        "step_00000001", "step_00000002"]  # nothing written for the poisoned iteration
    assert not (tmp_path / "cut").exists()
    with pytest.raises(LLMKitError, match="--resume to continue it"):
        grpo(rl_cfg("grpo", tmp_path / "cut"), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": NaNAt()})
    s = grpo(rl_cfg("grpo", tmp_path / "cut"), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": NaNAt()},
             resume=True)
    assert s["optimizer_steps"] == 4 * 2 * 4 // 4
    assert_same_run(tmp_path / "ref", tmp_path / "cut")


def test_ppo_nan_loss_stops_keeps_the_good_checkpoint_and_resumes_exactly(tmp_path, tok, monkeypatch):
    import llmkit.recipes.rl as rl
    from llmkit.recipes.ppo import ppo

    cfg = ("ppo.kl_target=0.5", "ppo.kl_horizon=20")  # β moves: resume must restore it
    ppo(rl_cfg("ppo", tmp_path / "ref", *cfg), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": digits})
    real, calls = rl.train_step, []

    def nan_loss_in_iteration_3(*a, **k):  # 2 optimiser steps per iteration (2 epochs x 1 minibatch)
        calls.append(1)
        stats = real(*a, **k)
        return {**stats, "loss": float("inf")} if len(calls) == 6 else stats

    monkeypatch.setattr(rl, "train_step", nan_loss_in_iteration_3)
    with pytest.raises(LLMKitError, match=r"loss became inf at iteration 3 \(optimiser step 6\); the last good "
                                          r"checkpoint .*step_00000002"):
        ppo(rl_cfg("ppo", tmp_path / "cut", *cfg), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": digits})
    monkeypatch.undo()
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "cut.partial" / "checkpoints"))
    assert state["loader"]["algorithm"]["kl_coef"] != 0.05 and state["loader"]["opt_step"] == 4
    ppo(rl_cfg("ppo", tmp_path / "cut", *cfg), model=tiny(), tokenizer=tok, quiet=True, rewards={"d": digits},
        resume=True)
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
