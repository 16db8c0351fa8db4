"""The table of fine-tuning methods: each method is one `PeftMethod` record, defined and registered
in its own file (lora.py, qlora.py, adapters.py, prompt_tuning.py, llama_adapter.py, selective.py,
full.py). Callers (`llmkit.peft.save_adapter`/`load_adapter`/`unload`, the fine-tuning recipe) look
a method up here and call its record; none of them names a method, so adding one touches one file.

A record says how to apply the method from its config sections, how to recognise it on a model,
which tensors it saves (under the keys of `peft`'s adapter files where `peft` has the method), how
to load them back, its `adapter_config.json`, how to apply it from such a config, and how to take
it off again (folding it into the weights first where that is possible).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import LLMKitError, closest


@dataclass(frozen=True)
class PeftMethod:
    """One fine-tuning method.

    apply(model, cfg, tokenizer) swaps modules / sets requires_grad in place; `cfg` is any object
    holding the sections named in `sections` as attributes (the recipe config, or
    `default_sections(method)`), plus an optional `seed`.
    """

    name: str  # the --method value: "lora", "prompt", ...
    default_lr: float  # AdamW peak learning rate when the config gives none
    apply: Callable[[nn.Module, Any, Any], nn.Module]
    sections: dict[str, type] = field(default_factory=dict)  # config key -> section dataclass read by apply
    saves_adapter: bool = True  # False: the result is a full checkpoint (full, selective)
    peft_type: str | None = None  # adapter_config.json "peft_type" (peft's name where peft has the method)
    is_applied: Callable[[nn.Module], bool] | None = None  # None: leaves no trace (or shares another's)
    state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None  # tensors under the saved keys
    load_state: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None  # after from_peft_config
    peft_config: Callable[[nn.Module, str | None], dict] | None = None  # (model, base model name) -> config
    from_peft_config: Callable[[nn.Module, dict], None] | None = None  # None: files load as another method
    unload: Callable[[nn.Module, bool], nn.Module] | None = None  # (model, merge) -> the plain model
    mergeable: bool = False  # the update folds into the base weights (unload with merge=True)
    validate: Callable[[Any], None] | None = None  # check the sections before any model is loaded
    supports_packing: bool = True  # trains on packed rows (several documents per sequence)
    summary: Callable[[nn.Module, Any], dict] | None = None  # (model, tokenizer) -> extra summary entries
    extra: dict = field(default_factory=dict)  # llmkit-only facts written beside the adapter config
    # (model, on) switches the adapter's contribution off/on without touching weights, so the same
    # model serves as its own base (DPO's reference); None: the method cannot (peft.disabled raises)
    set_enabled: Callable[[nn.Module, bool], None] | None = None


# name -> record, filled by `register` as the method files are imported (llmkit.peft imports them
# all); a constant table like modules.NORMS, not state that changes while a program runs
REGISTRY: dict[str, PeftMethod] = {}


def register(method: PeftMethod) -> PeftMethod:
    if method.name in REGISTRY:
        raise ValueError(f"PEFT method {method.name!r} is registered twice")
    if method.saves_adapter and None in (method.peft_type, method.state, method.load_state, method.peft_config,
                                         method.unload):
        raise ValueError(f"PEFT method {method.name!r} saves an adapter but lacks one of peft_type, state, "
                         "load_state, peft_config, unload")
    REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_method(name: str) -> PeftMethod:
    """The record of `name`; an unknown name raises LLMKitError suggesting the close spelling."""
    if name not in REGISTRY:
        raise LLMKitError(f"unknown method {name!r}{closest(name, REGISTRY)}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def default_sections(method: PeftMethod | str, **given) -> types.SimpleNamespace:
    """A `cfg` for `method.apply`: each of its sections at its defaults unless given."""
    m = get_method(method) if isinstance(method, str) else method
    return types.SimpleNamespace(**({k: t() for k, t in m.sections.items()} | given))


def for_peft_type(peft_type: str) -> PeftMethod:
    """The method that applies adapter files of `peft_type` (the one with from_peft_config)."""
    found = [m for m in REGISTRY.values() if m.peft_type == peft_type and m.from_peft_config is not None]
    if not found:
        known = sorted({m.peft_type for m in REGISTRY.values() if m.from_peft_config is not None})
        raise LLMKitError(f"unsupported adapter type {peft_type!r} (supported: {', '.join(known)})")
    return found[0]


def detect(model: nn.Module) -> PeftMethod | None:
    """The adapter method the model carries, or None; several at once raise LLMKitError."""
    found = [m for m in REGISTRY.values() if m.is_applied is not None and m.is_applied(model)]
    if len(found) > 1:
        raise LLMKitError(f"model carries several adapter kinds ({', '.join(m.name for m in found)}); "
                          "save them one at a time")
    return found[0] if found else None
