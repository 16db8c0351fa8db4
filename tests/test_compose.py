"""Swaps compose: every PEFT method on every quantization, with and without fused projections.

For each (method, quantization, fused) the adapted model is checked against the same adapter on the
unquantized, unfused model: logits, scores (llmkit.scoring) and the eval harness's tree-packed
continuation log-likelihoods within a small multiple of the error the quantization alone makes on the
plain base (measured here, not a loose constant), greedy generation (llmkit.inference) consistent with
the model's own full forward, and one fine-tuning step (the finetune recipe's loss_fn through the
shared train_step) that moves only the adapter. No caller tests which method or quantization it holds.
"""

import copy

import pytest
import torch

from llmkit.eval.harness import continuation_logprobs
from llmkit.inference import SamplingParams, generate
from llmkit.models import ModelConfig, Transformer
from llmkit.peft import apply_adapters, apply_llama_adapter, apply_lora, apply_prompt_tuning
from llmkit.peft.common import freeze
from llmkit.quant import QuantLinear, fuse_projections, quantize
from llmkit.recipes.finetune import sft_loss
from llmkit.scoring import token_logprobs
from llmkit.train.loop import train_step

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


# the eval harness's shape of work: one shared context, several continuations (one tree)
PAIRS = [(SEQ[0, :8].tolist(), SEQ[0, 8:12].tolist()), (SEQ[0, :8].tolist(), [5, 9, 200]),
         (SEQ[0, :3].tolist(), SEQ[0, 3:9].tolist())]


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
        got, want = model(SEQ), ref(SEQ)
        assert float((got - want).abs().max()) <= 4 * e_logits + 1e-4
        s_got = torch.as_tensor(token_logprobs(model, SEQ[0]))
        s_want = torch.as_tensor(token_logprobs(ref, SEQ[0]))
        assert float((s_got - s_want).abs().max()) <= 4 * e_score + 1e-4
        # the eval harness (tree-packed rows with an explicit attention mask): a sum of n token
        # log-probs, each within the per-token bound above
        ll_got, ll_want = continuation_logprobs(model, PAIRS), continuation_logprobs(ref, PAIRS)
        for (_, cont), a, b in zip(PAIRS, ll_got, ll_want):
            assert abs(a - b) <= len(cont) * (4 * e_score + 1e-4)
        # greedy generation (prefill + few-row decode kernels) picks the top token of the model's own
        # full forward at every step, up to the gap between the kernels and the dequantized GEMM
        prompt = SEQ[0, :6].tolist()
        toks = generate(model, prompt, SamplingParams(max_new_tokens=5)).tokens
        full = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1]  # (5, V)
        chosen = full.gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert bool((chosen >= full.max(-1).values - (2 * e_logits + 1e-4)).all())

    # one fine-tuning step: finite loss, gradients reach every adapter tensor, nothing else moves
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (not trainable) == (method == "none")
    if not trainable:
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}  # id(p) -> its gradient, caught by hooks: train_step zeroes them after stepping
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = {"idx": SEQ[:, :-1], "targets": SEQ[:, 1:]}
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g, p=p: grads.__setitem__(id(p), g.clone()))
    stats = train_step(model, opt, [batch], loss_fn=sft_loss, grad_clip=0.0)  # the finetune recipe's loss
    assert torch.isfinite(torch.tensor(stats["loss"]))
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = grads.get(id(p))
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
