"""Fine-tuning speed pieces (issue 19, item 7): the fused output projection + cross-entropy equals
F.cross_entropy in value and gradient, sft_loss with it gives the same losses and gradients as the
plain logits path, and `llmkit bench finetune --compare peft` runs on a tiny random model."""

import json

import pytest
import torch
import torch.nn.functional as F

from _shared import byte_chat_tokenizer, tiny_llama
from llmkit.losses import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_f_cross_entropy(reduction, with_bias):
    g = torch.Generator().manual_seed(0)
    N, C, V = 37, 16, 101
    h = torch.randn(3, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    t = torch.randint(0, V, (3, N), generator=g)
    t[0, :5] = -100  # ignored positions: no loss, no gradient
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, V), t.reshape(-1), reduction=reduction)
    # chunks of 2 rows (202 logits): many chunks and a ragged last one
    ours = linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_elements=2 * V)
    wrt = [h, w] + ([b] if with_bias else [])
    g_ref = torch.autograd.grad(ref * 1.7, wrt)
    g_ours = torch.autograd.grad(ours * 1.7, wrt)  # the incoming gradient scales the saved ones
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)  # fp32 softmax


def test_linear_cross_entropy_frozen_weight_and_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g) * 0.1  # frozen: no gradient computed or returned for it
    t = torch.randint(0, 300, (64,), generator=g)
    ref = F.cross_entropy(F.linear(h, w), t)
    (gh_ref,) = torch.autograd.grad(ref, h)
    ours = linear_cross_entropy(h, w, t)
    (gh,) = torch.autograd.grad(ours, h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, gh_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls in bf16, as F.linear under autocast
        lo = linear_cross_entropy(h, w, t)
    assert abs(float(lo.detach()) - float(ref.detach())) < 2e-2


def test_sft_loss_fused_equals_plain_logits():
    """The fine-tuning loss on the fused path gives the losses and gradients of the full-logits path."""
    from llmkit.peft import apply_lora
    from llmkit.recipes.finetune import sft_loss

    model = apply_lora(tiny_llama(), r=4, alpha=8.0).train()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    for _, p in model.named_parameters():  # train the tied head too: its weight gradient is checked
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 260, (2, 17), generator=g)
    t = x[:, 1:].clone()
    t[:, :4] = -100  # prompt tokens
    batch = {"idx": x[:, :-1], "targets": t}
    loss, _ = sft_loss(model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(batch["idx"])
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bench_finetune_against_peft(tmp_path, capsys, method):
    pytest.importorskip("peft" if method == "lora" else "transformers")
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    d = tmp_path / "tiny"
    save_checkpoint(tiny_llama(), d, tokenizer=byte_chat_tokenizer())
    rc = main(["bench", "finetune", "--model", str(d), "--method", method, "--compare", "peft", "--batch", "2",
               "--seq", "16", "--steps", "2", "--threads", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    ref = "transformers" if method == "full" else "peft"
    assert rc == 0 and not out["skipped"]
    r, p = out["results"]["llmkit"], out["results"][ref]
    assert r["trainable"] == p["trainable"]
    # same weights, batch, LoRA init and AdamW: the same loss curve, not just the same first loss
    assert out["first_loss_abs_diff"] < 1e-4
    for a, b in zip(r["losses"], p["losses"]):
        assert abs(a - b) < 1e-3
    assert r["losses"][-1] < r["losses"][0]
    assert out["ratio_llmkit_over_" + ref] > 0


def test_bench_finetune_bad_input(tmp_path):
    from llmkit.cli import main

    assert main(["bench", "finetune", "--model", str(tmp_path / "nope"), "--compare", "x"]) == 2
    assert main(["bench", "finetune", "--model", str(tmp_path / "nope"), "--batch", "0"]) == 2


def test_lora_step_computes_no_base_weight_gradients():
    """LoRA freezes the base: after a fine-tuning step only lora_A/lora_B hold gradients (autograd never
    computed a weight gradient for a frozen linear, the embedding or the tied output head)."""
    from llmkit.peft import apply_lora
    from llmkit.recipes.finetune import sft_loss

    model = apply_lora(tiny_llama(), r=4, alpha=8.0).train()
    x = torch.randint(0, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, _ = sft_loss(model, {"idx": x[:, :-1], "targets": x[:, 1:]})
    loss.backward()
    for n, p in model.named_parameters():
        lora = ".lora_A." in n or ".lora_B." in n
        assert p.requires_grad == lora, n
        assert (p.grad is not None) == lora, n
