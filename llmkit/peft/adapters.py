"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small residual MLP is inserted after the attention sub-layer and after the MLP sub-layer of every
block, before they are added to the residual stream (fig. 2):

    h = f(x);   h + up(act(down(h)))      down: C -> m, up: m -> C, m << C

`up` starts at zero so the adapted model starts equal to the base model (the paper uses a
near-identity init; exact zero makes that property testable). Only the adapters are trained.
The sub-modules are wrapped in place (`AdapterWrapped.module` holds the original).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .common import freeze, load_trainable
from .registry import PeftMethod, register


@dataclass
class AdapterSection:
    """The `adapter:` section of a fine-tuning config."""

    bottleneck: int = 64
    where: list[str] = field(default_factory=lambda: ["self_attn", "mlp"])


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return h + self.up(F.gelu(self.down(h)))


class AdapterWrapped(nn.Module):
    """module(*args) followed by a bottleneck adapter on its output."""

    def __init__(self, module: nn.Module, dim: int, bottleneck: int):
        super().__init__()
        self.module = module
        t = next(iter([*module.parameters(), *module.buffers()]))  # a quantized sub-layer may hold only buffers
        self.adapter = Bottleneck(dim, bottleneck, device=t.device, dtype=t.dtype if t.is_floating_point() else None)
        self.enabled = True  # False: the wrapped sub-layer alone (llmkit.peft.disabled)

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        return self.adapter(out) if self.enabled else out


def apply_adapters(model: nn.Module, bottleneck: int = 64, where=("self_attn", "mlp")) -> nn.Module:
    """Wrap the attention and/or MLP sub-layer of every block; freeze everything else."""
    if bottleneck <= 0:
        raise LLMKitError(f"adapter bottleneck size must be positive, got {bottleneck}")
    bad = [w for w in where if w not in ("self_attn", "mlp")]
    if bad:
        raise LLMKitError(f"adapters go after 'self_attn' and/or 'mlp' sub-layers, not {bad[0]!r}")
    freeze(model)
    dim = model.cfg.d_model
    for layer in model.layers:
        for w in where:
            sub = getattr(layer, w)
            if not isinstance(sub, AdapterWrapped):
                setattr(layer, w, AdapterWrapped(sub, dim, bottleneck))
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterWrapped) for m in model.modules())


def unload_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the wrapped sub-layers back (a bottleneck is non-linear: it cannot be merged)."""
    for layer in model.layers:
        for w in ("self_attn", "mlp"):
            sub = getattr(layer, w)
            if isinstance(sub, AdapterWrapped):
                setattr(layer, w, sub.module)
    return model


def set_adapters_enabled(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, AdapterWrapped):
            m.enabled = on


def adapters_config(model: nn.Module) -> dict:
    where = sorted({n.split(".")[2] for n, m in model.named_modules() if isinstance(m, AdapterWrapped)})
    if not where:
        raise LLMKitError("model has no bottleneck adapters to save")
    first = next(m for m in model.modules() if isinstance(m, Bottleneck))
    # no peft type exists for Houlsby adapters: this file is read by llmkit only
    return {"peft_type": "LLMKIT_BOTTLENECK", "task_type": "CAUSAL_LM", "bottleneck": first.down.out_features,
            "where": where}


def adapters_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bottleneck tensors under llmkit's names (layers.0.mlp.adapter.down.weight (m, C), ...)."""
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k}


def adapters_from_config(model: nn.Module, cfg: dict) -> None:
    apply_adapters(model, bottleneck=int(cfg["bottleneck"]), where=tuple(cfg.get("where", ("self_attn", "mlp"))))


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    return apply_adapters(model, cfg.adapter.bottleneck, tuple(cfg.adapter.where))


ADAPTER = register(PeftMethod(
    name="adapter", default_lr=1e-3, apply=_apply, sections={"adapter": AdapterSection},
    peft_type="LLMKIT_BOTTLENECK", is_applied=has_adapters, state=adapters_state, load_state=load_trainable,
    peft_config=lambda model, base: adapters_config(model), from_peft_config=adapters_from_config,
    unload=unload_adapters, set_enabled=set_adapters_enabled))
