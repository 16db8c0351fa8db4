"""Selective fine-tuning: train a chosen subset of the existing parameters, freeze the rest.

Three ways to choose (combinable): named modules (any parameter whose name contains one of the
names as a dotted component run, e.g. "norm", "layers.11", "mlp.down_proj"), the top N layers (the
ones nearest the output, the usual choice since lower layers hold more general features; Lee et al.
2019 "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning"), or attention only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import LLMKitError
from .common import freeze
from .registry import PeftMethod, register


@dataclass
class SelectiveSection:
    """The `selective:` section of a fine-tuning config (the arguments of `select_trainable`)."""

    modules: list[str] = field(default_factory=list)
    top_n_layers: int = 0
    attention_only: bool = False


def select_trainable(model: nn.Module, modules: list[str] | None = None, top_n_layers: int = 0,
                     attention_only: bool = False) -> nn.Module:
    """Freeze everything, then unfreeze the chosen parameters. Returns the model."""
    modules = list(modules or [])
    n_layer = len(model.layers)
    if not modules and not top_n_layers and not attention_only:
        raise LLMKitError("selective fine-tuning needs modules=[...], top_n_layers=N or attention_only=true")
    if not 0 <= top_n_layers <= n_layer:
        raise LLMKitError(f"top_n_layers must be in 0..{n_layer} (the model has {n_layer} layers), got {top_n_layers}")
    names = [n for n, _ in model.named_parameters()]
    for m in modules:
        if not any(_contains(n, m) for n in names):
            short = sorted({part for n in names for part in n.split(".") if not part.isdigit()})
            raise LLMKitError(f"module {m!r} matches no parameter of this model; names that do exist: {', '.join(short)}")
    freeze(model)
    top = {f"layers.{i}" for i in range(n_layer - top_n_layers, n_layer)}
    for name, p in model.named_parameters():
        layer = ".".join(name.split(".")[:2])
        chosen = any(_contains(name, m) for m in modules)
        if top_n_layers and layer in top:
            chosen = chosen or not attention_only or ".self_attn." in name
        elif attention_only and not top_n_layers:
            chosen = chosen or ".self_attn." in name
        if chosen:
            p.requires_grad_(True)
    return model


def _contains(name: str, part: str) -> bool:
    """True if `part` occurs in `name` as whole dotted components ("layers.1" is not in "layers.11.x")."""
    return f".{part}." in f".{name}."


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    s = cfg.selective
    return select_trainable(model, s.modules, s.top_n_layers, s.attention_only)


# trains the model's own parameters: the result is a checkpoint, not an adapter
SELECTIVE = register(PeftMethod(name="selective", default_lr=5e-5, apply=_apply,
                                sections={"selective": SelectiveSection}, saves_adapter=False))
