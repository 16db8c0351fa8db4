"""Reward model: Bradley-Terry loss against TRL, HF sequence-classification parity both ways, LoRA on the RM."""

import types
from collections import defaultdict

import pytest
import torch

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
    assert abs(float(loss) - 0.6931471805599453) < 1e-7 and float(m["accuracy"]) == 0
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
