"""Fast CPU linears for inference: int8 or int4 weight-only for decoding, bf16 for prefill.
A module swap on the one Transformer (inference only): `quantize(model, "int8" | "int4")`.

Decoding one token reads every weight once, so its speed is memory bandwidth: int8 reads a quarter
of fp32's bytes, int4 an eighth. Few-row inputs (decode, speculative verification) run PyTorch's
weight-only kernels on bf16 activations:
  int8  per output channel, symmetric: w = s * q, q in [-127, 127], s = max|w_row| / 127
        (absmax, as LLM.int8 without outliers, Dettmers et al. 2022) -> torch._weight_int8pack_mm
  int4  per group of 32 inputs, asymmetric: w = s * q + m, q in [0, 15], s = (max - min) / 15, m = min
        (the Q4_1 layout of GGUF, so a Q4_1 model's weights come back exactly up to bf16 rounding of
        s and m) -> aten._weight_int4pack_mm_for_cpu
Measured on this 2-core Xeon (1 thread, all SmolLM2 matrices once): fp32 71 ms, int8 39 ms, int4 20 ms.
Those kernels are slow for many rows, where the matmul is compute bound instead: prefill runs a bf16
copy of the weight (AMX/AVX512-bf16 GEMM, ~5x faster than fp32 at 128 rows).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError

SMALL_M = 8  # inputs of at most this many rows use the weight-only kernels
GROUP = 32  # int4 group size (GGUF Q4_0/Q4_1 blocks)
MODES = ("int8", "int4")


def int4_ok(linear: nn.Linear) -> bool:
    """Shapes the int4 pack kernel takes."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


def int8_ok(linear: nn.Linear) -> bool:
    """Shapes the int8 pack kernel takes (torch 2.13 reads past the row when in_features % 16 != 0)."""
    return linear.in_features % 16 == 0


class QuantLinear(nn.Module):
    """y = x W^T + b with W quantised (few rows) and as bf16 (many rows). Output in x's dtype."""

    def __init__(self, linear: nn.Linear, mode: str = "int8"):
        super().__init__()
        if mode not in MODES:
            raise LLMKitError(f"unknown quantisation {mode!r} (known: {', '.join(MODES)})")
        self.mode, self.in_features, self.out_features = mode, linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (N, K)
        if mode == "int8":
            if not int8_ok(linear):
                raise LLMKitError(f"int8 needs in_features divisible by 16, got {linear.in_features}")
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(torch.bfloat16))
        else:
            N, K = w.shape
            if not int4_ok(linear):
                raise LLMKitError(f"int4 needs in_features divisible by {GROUP} and out_features by 16, "
                                  f"got {K} and {N}")
            g = w.reshape(N, K // GROUP, GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            s = ((hi - lo) / 15).clamp_min(1e-12)
            q = torch.round((g - lo) / s).clamp(0, 15).to(torch.int32).reshape(N, K)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            # the kernel computes (q - 8) * s + z, so z = m + 8 s; layout (K/G, N, 2)
            z = lo + 8 * s
            self.register_buffer("scales", torch.stack([s[..., 0].t(), z[..., 0].t()], -1).contiguous().to(torch.bfloat16))
        self.register_buffer("w16", w.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        xb = x.to(torch.bfloat16)
        if rows > SMALL_M:
            y = F.linear(xb, self.w16)
        else:
            x2 = xb.reshape(rows, -1)
            if self.mode == "int8":
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up linears (modules with a `fuse()` method) in place: fewer, larger
    matmuls per decode step. Inference only (adapters and checkpoints name the separate projections)."""
    for m in list(model.modules()):
        if hasattr(m, "fuse"):
            m.fuse()
    return model


def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Fuse q/k/v and gate/up (`fuse_projections`), then swap every nn.Linear of `model` (in place) for a QuantLinear; returns the model.

    The output head stays int8 under int4: its errors land directly on the logits (llama.cpp likewise
    keeps `output` at Q6_K/Q8_0 in its 4-bit files; SmolLM2's head is the Q8_0 embedding), and so
    does any linear whose shape the int4 kernel does not take; linears neither kernel takes stay fp32."""
    if mode not in MODES:
        raise LLMKitError(f"unknown quantisation {mode!r} (known: {', '.join(MODES)})")
    fuse_projections(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                m = "int8" if name == "lm_head" or not int4_ok(child) else mode
                if m == "int8" and not int8_ok(child):
                    continue
                setattr(mod, name, QuantLinear(child, m))
    return model
