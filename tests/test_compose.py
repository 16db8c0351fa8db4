"""Swaps compose: every PEFT method on every quantization, with and without fused projections.

For each (method, quantization, fused) the adapted model is checked against the same adapter on the
unquantized, unfused model: logits and scores within a small multiple of the error the quantization
alone makes on the plain base (measured here, not a loose constant), greedy generation consistent
with the model's own full forward, and one fine-tuning step that moves only the adapter.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from llmkit.inference import SamplingParams, generate
from llmkit.models import ModelConfig, Transformer
from llmkit.peft import apply_adapters, apply_llama_adapter, apply_lora, apply_prompt_tuning
from llmkit.peft.common import freeze
from llmkit.peft.prompt_tuning import forward_with_prompt, has_soft_prompt
from llmkit.quant import QuantLinear, fuse_projections, quantize
from llmkit.scoring import token_logprobs

METHODS = {
    "none": lambda m: freeze(m) or m,  # the base alone, frozen
    "lora": lambda m: apply_lora(m, targets="all-linear", r=4, alpha=8),
    "adapter": lambda m: apply_adapters(m, bottleneck=16),
    "prompt": lambda m: apply_prompt_tuning(m, n_tokens=4, seed=0),
    "llama-adapter": lambda m: apply_llama_adapter(m, adapter_len=4, n_layers=2),
}
QUANTS = ["none", "int8", "int4", "nf4"]
SEQ = torch.tensor([[(7 * i + 3) % 256 for i in range(16)]])


def base_model() -> Transformer:
    # d_model and d_ff multiples of 64: every linear takes the int4 kernel and whole NF4 blocks
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-llama", d_model=64, n_head=4, n_kv_head=2, d_ff=128)).eval()


def logits(model, ids):
    return forward_with_prompt(model, ids) if has_soft_prompt(model) else model(ids)


def adapted(base, method, quant, fused):
    """quantize -> apply the adapter -> give it the reference's (non-trivial) values -> fuse."""
    model = copy.deepcopy(base)
    if quant != "none":
        quantize(model, quant)
    METHODS[method](model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters start as the identity; random values make them matter
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.numel() == 1 else 0.05))
    return fuse_projections(model) if fused else model


@pytest.fixture(scope="module")
def setup():
    base = base_model()
    with torch.no_grad():
        ref_logits = base(SEQ)
        ref_scores = token_logprobs(base, SEQ[0])
        err = {"none": (0.0, 0.0)}
        for q in QUANTS[1:]:  # the quantization's own error on the plain base
            m = quantize(copy.deepcopy(base), q)
            err[q] = (float((m(SEQ) - ref_logits).abs().max()),
                      float((torch.as_tensor(token_logprobs(m, SEQ[0])) - torch.as_tensor(ref_scores)).abs().max()))
    return base, err


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_quantized_base(setup, method, quant, fused):
    base, err = setup
    ref = adapted(base, method, "none", False)
    model = adapted(base, method, quant, fused)
    if quant != "none":
        assert any(isinstance(m, QuantLinear) for m in model.modules())
    if fused:
        assert all(a.qkv_proj is not None for a in model.modules() if hasattr(a, "qkv_proj"))
    e_logits, e_score = err[quant]
    with torch.no_grad():
        # forward logits and scores: within 4x the plain base's quantization error (+ fp32 round-off)
        got, want = logits(model, SEQ), logits(ref, SEQ)
        assert float((got - want).abs().max()) <= 4 * e_logits + 1e-4
        s_got = torch.as_tensor(token_logprobs(model, SEQ[0]))
        s_want = torch.as_tensor(token_logprobs(ref, SEQ[0]))
        assert float((s_got - s_want).abs().max()) <= 4 * e_score + 1e-4
        # greedy generation (prefill + few-row decode kernels) picks the top token of the model's own
        # full forward at every step, up to the gap between the kernels and the dequantized GEMM
        prompt = SEQ[0, :6].tolist()
        toks = generate(model, prompt, SamplingParams(max_new_tokens=5)).tokens
        full = logits(model, torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1]  # (5, V)
        chosen = full.gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert bool((chosen >= full.max(-1).values - (2 * e_logits + 1e-4)).all())

    # one fine-tuning step: finite loss, gradients reach every adapter tensor, nothing else moves
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (not trainable) == (method == "none")
    if not trainable:
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model, SEQ)
    loss = F.cross_entropy(out[0, :-1], SEQ[0, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
