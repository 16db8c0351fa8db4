"""Quantization-aware training: fake quantization with a straight-through estimator, then the real thing.

    prepare_qat(model, "int4-sym-b32")   # every linear quantize() would swap computes with Q(W) instead of W
    ... train (full fine-tuning: the fp32 W are the trained parameters) ...
    convert_qat(model)                   # -> QuantLinears of the same method: exactly the trained forward

Forward: y = x Q(W)^T with Q = the method's dequantize(quantize(W)) (`QuantMethod.roundtrip`), so the loss
sees the rounding the deployed model will have. Backward: Q is piecewise constant (zero gradient almost
everywhere), so the straight-through estimator (Bengio et al. 2013; as used for QAT by Jacob et al. 2018)
passes dL/dQ(W) to W unchanged: W_q = W + (Q(W) - W).detach(). The fp32 W keeps accumulating small updates
that eventually move a weight across a rounding boundary. Scales are re-derived from W at every step
(absmax / zero-point: no learned step size as in LSQ).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from . import QuantLinear, _set_module, plan
from .methods import QuantMethod, get_method


class FakeQuantLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose forward uses the weight fake-quantized by
    `method`, with a straight-through gradient to the fp32 weight. x (..., K) -> (..., N)."""

    def __init__(self, linear: nn.Linear, method: QuantMethod):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: optimisers see them
        self.method = method

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        q = self.method.roundtrip(w.detach().float()).to(w.dtype)  # (N, K), no graph through rounding
        return w + (q - w).detach()  # value Q(W), gradient identity (STE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method.name}"


def prepare_qat(model: nn.Module, method: str | QuantMethod | None, targets=None) -> nn.Module:
    """Swap the linears `quantize(model, method)` would quantize (same head and fallback rules) for
    FakeQuantLinears, in place. method None or "": nothing to do. Returns the model."""
    if not method:
        return model
    rec = method if isinstance(method, QuantMethod) else get_method(method)
    for name, child, m in plan(model, rec, targets):
        if m.calibrated:
            raise LLMKitError(f"qat={rec.name}: calibrated (outlier-aware) methods are not trained with QAT; "
                              "use the base method")
        _set_module(model, name, FakeQuantLinear(child, m))
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Every FakeQuantLinear -> the QuantLinear of its method holding quantize(W): the model then computes
    what it computed in training (same Q(W)), from the quantized tensors only. In place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            _set_module(model, name, QuantLinear.from_linear(plain, m.method))
    return model
