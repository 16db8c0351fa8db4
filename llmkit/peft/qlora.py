"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on a base
whose linears are stored in 4-bit NormalFloat with double quantization (nf4.py).

The record is LoRA's with a different `apply` (quantize, then add LoRA): the adapter it saves is a
plain `peft` LORA adapter, which loads as LoRA on any copy of the base model (full precision or NF4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from .lora import LORA, LoRAConfig
from .nf4 import BLOCKSIZE, quantize_model_nf4
from .registry import register


@dataclass
class QLoRASection:
    """The `qlora:` section of a fine-tuning config (the LoRA itself is configured in `lora:`)."""

    blocksize: int = BLOCKSIZE
    double_quant: bool = True
    quantize: str = "all-linear"  # which linears are stored in NF4 (lm_head stays: tied to the embedding)


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    q = cfg.qlora
    quantize_model_nf4(model, q.quantize, q.blocksize, q.double_quant)
    return LORA.apply(model, cfg, tokenizer)


# is_applied/from_peft_config stay LoRA's: a saved QLoRA adapter is a LoRA adapter
QLORA = register(dataclasses.replace(LORA, name="qlora", apply=_apply,
                                     sections={"lora": LoRAConfig, "qlora": QLoRASection},
                                     is_applied=None, from_peft_config=None, extra={"nf4_base": True}))
