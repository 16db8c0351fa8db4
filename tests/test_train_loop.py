"""The shared training seams: the batched log-prob function (with gradients, against a manual
log_softmax gather), train_step with a recipe's loss_fn, the shared config sections and their one
number coercion."""

import pytest
import torch

from llmkit.config import load_config
from llmkit.errors import LLMKitError
from llmkit.losses import sequence_logprobs
from llmkit.models import ModelConfig, Transformer
from llmkit.recipes.config import OptimSection, TrainSection, every
from llmkit.recipes.finetune import FinetuneConfig
from llmkit.recipes.pretrain import PretrainConfig
from llmkit.scoring import token_logprobs
from llmkit.train.loop import lm_loss, train_step


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=64, max_seq_len=32))


def test_sequence_logprobs_match_manual_gather_with_mask_and_gradients():
    model = tiny()
    idx = torch.randint(0, 64, (3, 10))
    targets = torch.randint(0, 64, (3, 10))
    targets[0, :4] = -100  # a prompt: not scored
    targets[2, 7:] = -100  # padding
    lp = sequence_logprobs(model, idx, targets)  # (B, T)
    assert lp.shape == (3, 10) and lp.requires_grad
    ref = torch.log_softmax(model(idx).double(), -1)
    for b in range(3):
        for t in range(10):
            want = 0.0 if targets[b, t] == -100 else float(ref[b, t, targets[b, t]].detach())
            assert float(lp[b, t].detach()) == pytest.approx(want, abs=1e-5)
    # gradients flow to every weight
    lp.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    model.zero_grad()
    masked = sequence_logprobs(model, idx, torch.full_like(targets, -100))
    assert masked.abs().sum() == 0 and masked.requires_grad


def test_token_logprobs_is_sequence_logprobs_without_grad():
    model = tiny()
    ids = torch.randint(0, 64, (20,))
    lp = token_logprobs(model, ids)  # one window, inference mode
    assert not lp.requires_grad and lp.shape == (19,)
    with torch.no_grad():
        direct = sequence_logprobs(model, ids[None, :-1], ids[None, 1:])[0]
    assert torch.allclose(lp, direct, atol=1e-6)
    long = torch.randint(0, 64, (80,))  # windowed (context 32, stride 16): the last window's tokens
    with torch.no_grad():
        last = sequence_logprobs(model, long[None, 48:79], long[None, 49:80])[0]
    assert torch.allclose(token_logprobs(model, long, stride=16)[-16:], last[-16:], atol=1e-6)


def test_train_step_takes_any_loss_fn_and_averages_its_metrics():
    """A preference-style loss_fn (two sequences per batch) through the same train_step; the metrics are
    the means over micro-batches, and accumulation over 2 micro-batches equals one full batch."""
    x = torch.randint(0, 64, (4, 9))

    def margin_loss(model, batch):  # -log sigmoid(logp(chosen) - logp(rejected)), DPO without a reference
        lp_c = sequence_logprobs(model, batch["chosen"][:, :-1], batch["chosen"][:, 1:]).sum(-1)
        lp_r = sequence_logprobs(model, batch["rejected"][:, :-1], batch["rejected"][:, 1:]).sum(-1)
        loss = -torch.nn.functional.logsigmoid(lp_c - lp_r).mean()
        return loss, {"loss": loss, "margin": (lp_c - lp_r).mean()}

    results = []
    for split in (4, 2):
        model = tiny(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        micro = [{"chosen": c, "rejected": c.flip(-1)} for c in x.split(split)]
        res = train_step(model, opt, micro, loss_fn=margin_loss, grad_clip=0.0)
        results.append((res, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (r1, p1), (r2, p2) = results
    assert set(r1) == {"loss", "margin", "grad_norm"}
    assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6) and r1["margin"] == pytest.approx(r2["margin"], abs=1e-5)
    assert (p1 - p2).abs().max() < 1e-6
    # lm_loss reports the plain CE beside the total
    r = train_step(tiny(), torch.optim.SGD(tiny().parameters(), lr=0.0), [{"idx": x[:, :-1], "targets": x[:, 1:]}],
                   loss_fn=lm_loss)
    assert r["loss"] == pytest.approx(r["ce"]) and r["ce"] > 3


def test_shared_sections_one_coercion_and_recipe_defaults(tmp_path):
    # YAML 1.1 reads 1e-3 as a string and 1e3 too: one coercion turns them into float / int
    p = load_config(PretrainConfig, None, ["optim.lr=1e-3", "train.steps=1e3", "optim.grad_clip=1"])
    assert p.optim.lr == 1e-3 and p.train.steps == 1000 and isinstance(p.optim.grad_clip, float)
    assert p.optim.min_lr == 3e-4  # the recipe's own default survives an override in the same section
    f = load_config(FinetuneConfig, None, ["optim.lr=2e-4", "train.steps=3"])
    assert isinstance(f.optim, OptimSection) and isinstance(f.train, TrainSection)
    assert f.optim.weight_decay == 0.0 and f.optim.warmup_steps == 10 and f.train.batch_size == 4
    assert f.optim.peak(1.0) == (2e-4, 2e-5) and f.data.seq_len == 512
    with pytest.raises(LLMKitError, match="must be a number"):
        load_config(FinetuneConfig, None, ["optim.lr=fast"])
    with pytest.raises(LLMKitError, match="must be an integer"):
        load_config(FinetuneConfig, None, ["train.steps=2.5"])
    with pytest.raises(LLMKitError, match=r"'seq_len'.*did you mean 'data.seq_len'"):
        load_config(FinetuneConfig, None, ["seq_len=64"])
    with pytest.raises(LLMKitError, match=r"'train.stpes'.*'steps'"):
        load_config(FinetuneConfig, None, ["train.stpes=64"])
    with pytest.raises(LLMKitError, match="'lora' is a section"):
        load_config(FinetuneConfig, None, ["lora=8"])
    assert [s for s in range(1, 7) if every(2, s)] == [2, 4, 6] and not any(every(0, s) for s in range(1, 7))
    with pytest.raises(LLMKitError, match=r"'max_steps'.*did you mean 'train.steps'"):  # a pre-sections key
        load_config(FinetuneConfig, None, ["max_steps=64"])
    # a YAML file with the sections, then overrides on top
    (tmp_path / "ft.yaml").write_text("method: full\ndata:\n  files: [a.jsonl]\n  packing: true\n"
                                      "optim:\n  lr: 5e-5\ntrain:\n  steps: 1e2\n  micro_batch_size: 2\n")
    f = load_config(FinetuneConfig, tmp_path / "ft.yaml", ["train.steps=7"])
    assert (f.method, f.data.files, f.data.packing, f.optim.lr, f.train.steps, f.train.micro_batch_size) == \
        ("full", ["a.jsonl"], True, 5e-5, 7, 2)
    assert f.data.seq_len == 512 and f.optim.weight_decay == 0.0  # the recipe's defaults where the file is silent
