"""QLoRA's base (Dettmers et al. 2023): linears stored in NF4 through the one quantization mechanism.

The NF4 math (bitsandbytes-exact) is in llmkit/quant/nf4.py and NF4 is the "nf4" record of
llmkit.quant's METHODS, beside int8 and int4; this file keeps QLoRA's entry points.
"""

from __future__ import annotations

import torch.nn as nn

from ..quant import QuantLinear, quantize
from ..quant.methods import nf4_method
from ..quant.nf4 import (BLOCKSIZE, BLOCKSIZE2, DYNAMIC_CODE, NF4_CODE, dequantize_blockwise, dynamic_code,
                         nf4_absmax, nf4_bits_per_param, nf4_code_from_quantiles, nf4_dequantize, nf4_quantize,
                         pack_4bit, quantize_blockwise, unpack_4bit)

__all__ = ["NF4Linear", "quantize_model_nf4", "memory_report", "BLOCKSIZE", "BLOCKSIZE2", "DYNAMIC_CODE", "NF4_CODE",
           "dequantize_blockwise", "dynamic_code", "nf4_absmax", "nf4_bits_per_param", "nf4_code_from_quantiles",
           "nf4_dequantize", "nf4_quantize", "pack_4bit", "quantize_blockwise", "unpack_4bit"]


def NF4Linear(linear: nn.Linear, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> QuantLinear:
    """A frozen linear stored in NF4 (+ double-quantised scales): a QuantLinear of the nf4 method."""
    return QuantLinear.from_linear(linear, nf4_method(blocksize, double_quant))


def quantize_model_nf4(model: nn.Module, targets="all-linear", blocksize: int = BLOCKSIZE,
                       double_quant: bool = True) -> nn.Module:
    """Swap linear layers (default all but lm_head, whose weight is often tied to the embedding) for
    NF4 QuantLinears, in place, frozen."""
    return quantize(model, nf4_method(blocksize, double_quant), targets=targets)


def memory_report(model: nn.Module) -> dict:
    """Bytes of the weights as stored now vs the same parameters in 16 and 32 bits. Parameters are the
    floating-point nn.Parameters plus the weights quantized layers stand for."""
    seen, stored, n_params = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        stored += t.numel() * t.element_size()
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.is_floating_point())
    n_params += sum(m.n_quantized_params for m in model.modules() if isinstance(m, QuantLinear))
    return {"stored_bytes": stored, "n_params": n_params, "bf16_bytes": 2 * n_params, "fp32_bytes": 4 * n_params,
            "saved_vs_bf16": 1 - stored / max(2 * n_params, 1)}
