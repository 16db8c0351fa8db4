"""Helpers shared by the parameter-efficient methods: finding and swapping modules, freezing,
counting trainable parameters, and the key names PEFT uses in adapter files.

Every method here is a module swap on the one `Transformer`: a module is replaced in place by a
wrapper that holds the original, never a second copy of the model.

Our module names already equal Hugging Face LLaMA's minus the "model." prefix
(`layers.0.self_attn.q_proj`), and `peft` adds "base_model.model." in front of the transformers
name, so an adapter tensor `layers.0.self_attn.q_proj.lora_A.weight` is stored under
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (lm_head under
`base_model.model.lm_head...`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LLMKitError

PEFT_PREFIX = "base_model.model."


def to_peft_key(name: str) -> str:
    """llmkit parameter name -> the key `peft` writes in adapter_model.safetensors."""
    return PEFT_PREFIX + (name if name.startswith("lm_head") else "model." + name)


def from_peft_key(key: str) -> str:
    """Inverse of `to_peft_key`; also accepts keys with the adapter name (".default.") left in."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    if key.startswith("model."):
        key = key[len("model."):]
    return key.replace(".default.", ".").removesuffix(".default")


def match_targets(model: nn.Module, targets, kinds=(nn.Linear,)) -> list[str]:
    """Module names matching `targets`, PEFT-style: a target matches a module whose full name equals
    it or ends with "." + target. "all-linear" = every linear but lm_head. Unknown targets raise
    LLMKitError listing the short names that exist."""
    if isinstance(targets, str):
        targets = [targets]
    candidates = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    if list(targets) == ["all-linear"]:
        return [n for n in candidates if n != "lm_head"]
    found: list[str] = []
    for t in targets:
        hits = [n for n in candidates if n == t or n.endswith("." + t)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise LLMKitError(f"target module {t!r} does not exist in this model; modules that do: "
                              f"{', '.join(short)} (or all-linear)")
        found += [h for h in hits if h not in found]
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule `name` (dotted path) by `new`, in the parent's train/eval mode (a fresh
    module is in train mode: its dropout would otherwise be active in an eval-mode model)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new.train(parent.training))


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (llmkit parameter names) into the model's parameters. They must cover exactly
    the trainable ones (the fresh adapter's) with the same shapes: anything else means the file was
    made for another base model or another adapter configuration (LLMKitError)."""
    own = dict(model.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    missing = sorted(expected - weights.keys())
    if missing:
        raise LLMKitError(f"lacks tensor {missing[0]!r} (and {len(missing) - 1} more): "
                          "it was made for another base model or another adapter configuration")
    with torch.no_grad():
        for k, v in weights.items():
            if k not in own:
                raise LLMKitError(f"has tensor {k!r} that this model does not have: it was made for another base model")
            p = own[k]
            if p.shape != v.shape:
                raise LLMKitError(f"was made for another base model: {k} has shape {tuple(v.shape)}, "
                                  f"this model needs {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_summary(model: nn.Module) -> dict:
    """{trainable, total, share}: counts unique tensors once (tied embeddings count once)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    # quantized weights live in buffers: count their parameters too (2 per byte for packed 4-bit)
    for m in model.modules():
        n = getattr(m, "n_quantized_params", None)
        if n:
            total += n
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}
