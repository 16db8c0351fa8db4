"""Verifiable rewards, the toy task, rollouts with the inference engine, and the GRPO recipe / CLI on a
tiny random model."""

import json

import pytest
import torch

from llmkit.align.rewards import correctness_reward, exact_match_reward, format_reward, get_rewards
from llmkit.align.rollout import IGNORE, build_batch, sample_rollouts
from llmkit.align.tasks import chat_prompt, load_prompts, toy_arithmetic
from llmkit.errors import LLMKitError
from llmkit.inference import SamplingParams, generate_batch
from llmkit.losses import sequence_logprobs
from llmkit.models import ModelConfig, Transformer

GSM = {"question": "q", "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"}


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
    return Tokenizer(hf, eos_token="<|im_end|>")


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=512))


# ---------------------------------------------------------------- rewards
@pytest.mark.parametrize("completion,correct", [
    ("<think>16-3-4 = 9 eggs, 9*2</think> 18", 1.0),
    ("<think>9 eggs</think> The answer is $18.", 1.0),
    ("so she makes 18.0", 1.0),  # no think block: the whole text is the answer
    ("<think>the answer is 18</think> 17", 0.0),  # the number in the reasoning does not count
    ("<think>9 * 2 = 18</think>", 0.0),  # nothing after the reasoning
    ("I don't know", 0.0),
    ("18 or maybe 1,800", 0.0),  # the last number counts
])
def test_gsm8k_correctness(completion, correct):
    assert correctness_reward(completion, GSM) == correct
    assert correctness_reward("1,800", {"answer": "#### 1,800"}) == 1.0


@pytest.mark.parametrize("completion,ok", [
    ("<think>2 + 3 = 5</think> 5", 1.0),
    ("  <think>\nadd them\n</think>\nThe answer is 5", 1.0),
    ("<think>2 + 3</think>", 0.0),  # no answer
    ("<think></think> 5", 0.0),  # empty reasoning
    ("5 <think>late</think> 5", 0.0),  # text before the reasoning
    ("<think>a <think> b</think> 5", 0.0),  # nested / unbalanced
    ("<think>a</think> 5 <think>b</think> 6", 0.0),  # two blocks
    ("The answer is 5", 0.0),
])
def test_format_reward(completion, ok):
    assert format_reward(completion, {}) == ok


def test_exact_match_and_names():
    ex = {"question": "q", "answer": "579"}
    assert exact_match_reward("<think>x</think> 579", ex) == 1.0
    assert exact_match_reward("<think>x</think> 579.", ex) == 0.0
    assert exact_match_reward("579", {"target": 579}) == 1.0
    assert list(get_rewards("correct, format")) == ["correct", "format"]
    with pytest.raises(LLMKitError, match="did you mean 'format'"):
        get_rewards("formt")
    with pytest.raises(LLMKitError, match="no 'answer' or 'target'"):
        correctness_reward("1", {"question": "q"})


def test_toy_task_and_prompt_files(tmp_path, tok):
    rows = toy_arithmetic(50, seed=3)
    assert rows == toy_arithmetic(50, seed=3) and rows != toy_arithmetic(50, seed=4)
    for r in rows:
        a, b = [int(x) for x in __import__("re").findall(r"\d+", r["question"])]
        assert 10 <= a <= 999 and 10 <= b <= 999 and r["answer"] == str(a + b)
        assert correctness_reward(f"<think>{a} + {b}</think> {a + b}", r) == 1.0
    ids = chat_prompt(tok, rows[0])
    text = tok.decode(ids)
    assert "<think>" in text and rows[0]["question"] in text and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(chat_prompt(tok, rows[0], prefill="<think>")) == text + "<think>"
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input": "1+1?", "target": 2.0}) + "\n\n" + json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(LLMKitError, match="p.jsonl:3: a prompt row needs question"):
        load_prompts(f)
    assert load_prompts(f, max_records=1)[0]["answer"] == "2.0"
    # prompts without answers (a reward model scores them): plain {"prompt"} rows and preference records
    hh = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello", "rejected": "\n\nHuman: hi there\n\nAssistant: go"}
    share = {"conversations": [{"from": "human", "value": "name a color"}], "chosen": {"from": "gpt", "value": "red"},
             "rejected": {"from": "gpt", "value": "no"}}
    f.write_text("".join(json.dumps(r) + "\n" for r in ({"prompt": "tell a joke"}, hh, share)))
    rows = load_prompts(f)
    assert [r["question"] for r in rows] == ["tell a joke", "hi there", "name a color"]
    assert [r["answer"] for r in rows] == [None] * 3
    assert rows[1]["messages"] == [{"role": "user", "content": "hi there"}]
    assert "hi there" in tok.decode(chat_prompt(tok, rows[1], system="S")) and "S" in tok.decode(chat_prompt(tok, rows[1], system="S"))
    with pytest.raises(LLMKitError, match="need a reward model"):
        correctness_reward("5", rows[0])


# ---------------------------------------------------------------- rollouts
def test_build_batch_layout():
    idx, targets = build_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert idx.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert targets.tolist() == [[IGNORE, IGNORE, 5, 6], [7, 8, 9, IGNORE]]


def test_rollouts_match_the_engine(tok):
    model = tiny()
    prompts = [tok.encode("<|im_start|>user\n12+34<|im_end|>\n"), tok.encode("hi")]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    r = sample_rollouts(model, tok, prompts, group_size=3, params=params, micro_batch=2)
    N = 6
    assert r.idx.shape == r.targets.shape == r.mask.shape == r.old_logps.shape and r.idx.size(0) == N
    assert r.prompt_index == [0, 0, 0, 1, 1, 1]
    assert r.mask.sum(1).tolist() == [float(n) for n in r.lengths]
    # the same samples the engine draws with that seed (prompt-major rows), ending in eos when stopped
    gens = generate_batch(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, n=3,
                                                          stop_ids=(tok.eos_id,)))
    comps = [c for g in gens for c in g.completions]
    for b, c in enumerate(comps):
        got = r.targets[b][r.mask[b].bool()].tolist()
        assert got == c.tokens + ([tok.eos_id] if c.finish_reason == "stop" else [])
        # old log-probs (full forward) = the engine's KV-cache log-probs of the sampled tokens
        torch.testing.assert_close(r.old_logps[b][r.mask[b].bool()][: len(c.tokens)], torch.tensor(c.logprobs),
                                   atol=1e-4, rtol=0)
    with torch.no_grad():
        full = sequence_logprobs(model, r.idx, r.targets)
    torch.testing.assert_close(r.old_logps, full, atol=1e-5, rtol=0)
    assert bool((r.old_logps[r.mask == 0] == 0).all()) and model.training


# ---------------------------------------------------------------- the recipe
def grpo_cfg(out, *over):
    from llmkit.config import load_config
    from llmkit.recipes.grpo import GRPOConfig

    base = ["model=tiny", f"train.out_dir={out}", "train.steps=2", "train.batch_size=4", "train.micro_batch_size=2",
            "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=8", "grpo.epochs=2",
            "data.toy_size=40", "data.val_prompts=4", "optim.lr=1e-3", "train.progress=false"]
    cfg = load_config(GRPOConfig, None, base + list(over))
    cfg.data.files = ["toy-arithmetic"]
    cfg.data.system = None  # short prompts for the byte-level toy tokenizer
    return cfg


def test_grpo_steps_change_only_the_adapter(tmp_path, tok):
    from llmkit.peft import load_adapter
    from llmkit.recipes.grpo import grpo

    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    # a random model earns no correctness/format reward: add one that varies within groups
    fns = {**get_rewards("correct,format"), "digits": lambda c, ex: float(sum(ch.isdigit() for ch in c))}
    s = grpo(grpo_cfg(tmp_path / "out"), model=model, tokenizer=tok, quiet=True, rewards=fns)
    assert s["optimizer_steps"] == 2 * 2 * 8 // 4
    assert set(s["before"]) == {"eval_correct", "eval_format", "eval_digits"}
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    plain = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert lora and plain.keys() == base.keys()
    assert all(torch.equal(plain[k], v) for k, v in base.items())  # base weights untouched
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for k in ("loss", "kl", "clip_frac", "reward_correct", "reward_format", "response_len", "grad_norm"):
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e6, k  # finite
    assert train[-1]["kl"] > 0  # the policy moved away from the reference
    assert (tmp_path / "out" / "rewards.png").stat().st_size > 0
    reloaded = load_adapter(tiny(), tmp_path / "out")
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x), model(x))
        assert not torch.allclose(tiny()(x), model(x))  # and the adapter is not a no-op


def test_grpo_bad_config(tmp_path, tok):
    from llmkit.recipes.grpo import grpo

    with pytest.raises(LLMKitError, match="group_size must be >= 2"):
        grpo(grpo_cfg(tmp_path / "o", "grpo.group_size=1"), model=tiny(), tokenizer=tok)
    with pytest.raises(LLMKitError, match="minibatches of train.batch_size"):
        grpo(grpo_cfg(tmp_path / "o", "train.batch_size=6"), model=tiny(), tokenizer=tok)
    with pytest.raises(LLMKitError, match="unknown reward"):
        grpo(grpo_cfg(tmp_path / "o", "grpo.rewards=correct,nope"), model=tiny(), tokenizer=tok)


def test_cli_align_grpo(tmp_path, tok, capsys):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    save_checkpoint(tiny(), tmp_path / "base", tokenizer=tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in toy_arithmetic(12, seed=1)))
    args = ["align", "--method", "grpo", "--model", str(tmp_path / "base"), "--data", str(prompts),
            "--out", str(tmp_path / "ad"), "train.steps=1", "train.batch_size=4", "grpo.group_size=2",
            "grpo.prompts_per_step=2", "grpo.max_new_tokens=4", "data.val_prompts=2", "data.system=hi",
            "train.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out correct" in out and "wrote" in out
    assert (tmp_path / "ad" / "adapter_config.json").is_file() and (tmp_path / "ad" / "grpo.json").is_file()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args[:-1] + ["--force", "grpo.temperature=0"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err
    ppo_args = ["align", "--method", "ppo"] + args[3:7] + ["--out", str(tmp_path / "ppo"), "--reward-model", "rm"]
    assert main(ppo_args) == 2 and "rm is not a reward model directory" in capsys.readouterr().err


# ---------------------------------------------------------------- PPO
def test_ppo_token_rewards():
    from llmkit.recipes.ppo import token_rewards

    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    logps, ref = -torch.rand(2, 4), -torch.rand(2, 4)
    rew, kl = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    for b in range(2):
        last = max(t for t in range(4) if mask[b, t])
        for t in range(4):
            want = -0.1 * float(logps[b, t] - ref[b, t]) * float(mask[b, t])
            want += [2.0, -1.0][b] if t == last else 0.0
            assert float(rew[b, t]) == pytest.approx(want, abs=1e-6)
    assert torch.equal(token_rewards(torch.zeros(2), logps, logps, mask, 0.1)[1], torch.zeros(2, 4))


def test_ppo_steps_run(tmp_path, tok):
    from llmkit.config import load_config
    from llmkit.recipes.ppo import PPOConfig, ppo

    cfg = load_config(PPOConfig, None, [
        "model=tiny", f"train.out_dir={tmp_path / 'out'}", "train.steps=2", "train.batch_size=4",
        "train.micro_batch_size=2", "ppo.group_size=2", "ppo.prompts_per_step=4", "ppo.max_new_tokens=6",
        "ppo.epochs=2", "data.toy_size=40", "data.val_prompts=2", "optim.lr=1e-3", "train.progress=false"])
    cfg.data.files, cfg.data.system = ["toy-arithmetic"], None
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fns = {"digits": lambda c, ex: float(sum(ch.isdigit() for ch in c))}
    s = ppo(cfg, model=model, tokenizer=tok, quiet=True, rewards=fns)
    assert s["optimizer_steps"] == 2 * 2 * 8 // 4
    plain = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(plain[k], v) for k, v in base.items())  # only the adapter (and value head) train
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for r in [r for r in recs if "reward" in r]:
        for k in ("loss", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl", "response_len"):
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e6, k
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "out" / "value_head.safetensors"))["weight"].abs().sum() > 0  # it learned


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_is_the_policy_before_training(method):
    """π_ref: the LoRA policy with its adapter switched off (no copy), or a frozen copy for full weights;
    either way the model's log-probs before any update, also after the policy has moved."""
    from llmkit.peft import apply_method, default_sections
    from llmkit.recipes.grpo import Reference

    base = tiny()
    x = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(3))
    want = sequence_logprobs(base, x[:, :-1], x[:, 1:]).detach()
    policy = apply_method(tiny(), method, default_sections(method))
    ref = Reference(policy)
    assert (ref.copy is None) == (method == "lora")  # no second copy of the weights for an adapter
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the policy moves away from the base
    assert (sequence_logprobs(policy, x[:, :-1], x[:, 1:]) - want).abs().max() > 1e-3
    got = ref.logps(policy, x[:, :-1], x[:, 1:], micro_batch=1)
    assert (got - want).abs().max() < 1e-5
