"""LLaMA-Adapter: adaption prompts with zero-initialised gating (Zhang et al. 2023,
"LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention").

In each of the top L layers, L_a learnable prompt vectors P (L_a, C) are projected by the layer's
own frozen k/v projections into extra keys and values. Every query also attends to them, in a
separate softmax, and that output is scaled by a learnable gate g initialised to 0 (eq. 8-10):

    out = attn(x) + o_proj( g · softmax(q K_pᵀ / sqrt(D)) V_p )

so training starts from the base model and the prompts' influence grows as g does. Computed as
`peft`'s AdaptionPrompt does (query after rotary embedding, prompt keys without it, fp32 softmax;
the same parameter names `adaption_prompt` (1, L_a, C) and `adaption_gate` (1,)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from ..models.modules import Attention, apply_rope
from .common import freeze, from_peft_key, load_trainable, to_peft_key
from .registry import PeftMethod, register


@dataclass
class LlamaAdapterSection:
    """The `llama_adapter:` section of a fine-tuning config."""

    adapter_len: int = 10  # L_a prompt vectors per layer
    n_layers: int = 8  # adapted layers, counted from the top


class AdaptedAttention(nn.Module):
    """Wraps one Attention module (kept as `model`, like peft) and adds the gated prompt attention."""

    def __init__(self, attn: Attention, adapter_len: int):
        super().__init__()
        self.model = attn
        self.adapter_len = adapter_len
        t = next(iter([*attn.parameters(), *attn.buffers()]))
        device, dtype = t.device, t.dtype if t.is_floating_point() else torch.float32  # quantized base: fp32
        c = attn.o_proj.out_features  # d_model
        # peft initialises the prompts N(0, 1) and the gate at 0
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, c, device=device, dtype=dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        out = self.model(x, rope, mask, cache, input_pos)  # (B, T, C)
        a = self.model
        B, T, _ = x.shape
        H, K, D = a.n_head, a.n_kv_head, a.head_dim
        # the projections through `qkv`, so that fused (qkv_proj), quantized or LoRA-wrapped ones serve alike
        q = a.qkv(x)[0].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), recomputed: attn does not return it
        if rope is not None:
            q = apply_rope(q, *rope)
        p = self.adaption_prompt.to(x.dtype)
        _, pk, pv = a.qkv(p)  # (1, L_a, K*D) each; the prompt's q is not used (L_a rows: cheap)
        pk = pk.view(1, self.adapter_len, K, D).transpose(1, 2)  # (1, K, L_a, D), no rotation
        pv = pv.view(1, self.adapter_len, K, D).transpose(1, 2)
        pk, pv = pk.repeat_interleave(H // K, dim=1), pv.repeat_interleave(H // K, dim=1)  # (1, H, L_a, D)
        scores = q @ pk.transpose(2, 3) / math.sqrt(D)  # (B, H, T, L_a)
        scores = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
        y = (scores @ pv).transpose(1, 2).reshape(B, T, H * D)
        return out + a.o_proj(y)


def apply_llama_adapter(model: nn.Module, adapter_len: int = 10, n_layers: int = 8) -> nn.Module:
    """Wrap the Attention of the top `n_layers` layers (in place); freeze everything else."""
    n = len(model.layers)
    if adapter_len <= 0:
        raise LLMKitError(f"llama-adapter: adapter_len must be positive, got {adapter_len}")
    if not 0 < n_layers <= n:
        raise LLMKitError(f"llama-adapter: n_layers must be in 1..{n} (the model has {n} layers), got {n_layers}")
    freeze(model)
    for i in range(n - n_layers, n):
        layer = model.layers[i]
        if not isinstance(layer.self_attn, AdaptedAttention):
            layer.self_attn = AdaptedAttention(layer.self_attn, adapter_len)
    return model


def adapted_layers(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if isinstance(layer.self_attn, AdaptedAttention)]


def has_llama_adapter(model: nn.Module) -> bool:
    return bool(adapted_layers(model))


def unload_llama_adapter(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain Attention modules back (the gated prompt attention cannot be merged)."""
    for layer in model.layers:
        if isinstance(layer.self_attn, AdaptedAttention):
            layer.self_attn = layer.self_attn.model
    return model


def llama_adapter_peft_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    layers = adapted_layers(model)
    if not layers:
        raise LLMKitError("model has no LLaMA-Adapter layers to save")
    return {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "adapter_len": model.layers[layers[0]].self_attn.adapter_len, "adapter_layers": len(layers),
            "target_modules": "self_attn", "inference_mode": True}


def llama_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """adaption_prompt (1, L_a, C) and adaption_gate (1,) of each adapted layer, under peft's keys."""
    return {to_peft_key(k): v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("adaption_")}


def load_llama_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    load_trainable(model, {from_peft_key(k): v for k, v in tensors.items()})


def llama_adapter_from_config(model: nn.Module, cfg: dict) -> None:
    apply_llama_adapter(model, adapter_len=int(cfg["adapter_len"]), n_layers=int(cfg["adapter_layers"]))


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    return apply_llama_adapter(model, cfg.llama_adapter.adapter_len, cfg.llama_adapter.n_layers)


LLAMA_ADAPTER = register(PeftMethod(
    name="llama-adapter", default_lr=1e-2, apply=_apply, sections={"llama_adapter": LlamaAdapterSection},
    peft_type="ADAPTION_PROMPT", is_applied=has_llama_adapter, state=llama_adapter_state,
    load_state=load_llama_adapter_state, peft_config=llama_adapter_peft_config,
    from_peft_config=llama_adapter_from_config, unload=unload_llama_adapter))
