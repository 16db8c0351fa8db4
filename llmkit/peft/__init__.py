"""Parameter-efficient fine-tuning as module swaps on the one Transformer.

    apply_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)       # lora.py
    quantize_model_nf4(model); apply_lora(model, ...)                     # QLoRA (nf4.py)
    apply_adapters(model, bottleneck=64)                                  # adapters.py
    apply_prompt_tuning(model, n_tokens=20)                               # prompt_tuning.py
    apply_llama_adapter(model, adapter_len=10, n_layers=8)                # llama_adapter.py
    select_trainable(model, top_n_layers=2)                               # selective.py

Each method is also one `PeftMethod` record (registry.py) registered in its own file, so code that
serves every method goes through the record: `apply_method(model, "lora", cfg)`, `default_lr(name)`,
`METHODS`. `save_adapter(model, dir)` writes only the method's tensors (adapter_model.safetensors)
and an adapter_config.json in `peft`'s format; `load_adapter(model, dir)` applies the swaps that
config names to a base model and loads the tensors (also adapters written by `peft`); `unload`
takes them off again; `with disabled(model):` switches the adapter off for a while (the base model
without a second copy: DPO's reference).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..io import MODEL_FILES, atomic_dir
# the method files register their records on import, in this order (the order of METHODS)
from . import full, selective, lora, qlora, adapters, prompt_tuning, llama_adapter  # noqa: F401, E401
from .adapters import AdapterSection, apply_adapters
from .common import trainable_summary
from .llama_adapter import LlamaAdapterSection, apply_llama_adapter
from .lora import LoRAConfig, LoRALinear, apply_lora, merge_lora, unload_lora, unmerge_lora
from .nf4 import NF4Linear, memory_report, quantize_model_nf4
from .prompt_tuning import PromptSection, apply_prompt_tuning, nearest_tokens
from .qlora import QLoRASection
from .registry import PeftMethod, default_sections, detect, for_peft_type, get_method, method_names, register
from .selective import SelectiveSection, select_trainable

__all__ = ["apply_lora", "LoRAConfig", "LoRALinear", "merge_lora", "unmerge_lora", "unload_lora",
           "quantize_model_nf4", "NF4Linear", "memory_report", "apply_adapters", "apply_prompt_tuning",
           "nearest_tokens", "apply_llama_adapter", "select_trainable", "trainable_summary",
           "save_adapter", "load_adapter", "adapter_method", "unload", "CONFIG_FILE", "WEIGHTS_FILE",
           "PeftMethod", "register", "get_method", "default_sections", "apply_method", "default_lr", "METHODS",
           "AdapterSection", "LlamaAdapterSection", "PromptSection", "QLoRASection", "SelectiveSection",
           "disabled", "can_disable", "PeftSections"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "llmkit_adapter.json"  # llmkit-only facts (e.g. trained on an NF4 base) kept out of peft's config

METHODS = method_names()  # the built-in methods; get_method also finds ones registered later


def _sections_dataclass():
    """One dataclass whose fields are the config sections of every registered method (lora, qlora,
    adapter, prompt, ...), each at its defaults. Recipe configs inherit it, so a method registered in
    its own file brings its `key:` section to every recipe without an edit there."""
    sections: dict[str, type] = {}
    for name in METHODS:
        for key, cls in get_method(name).sections.items():
            sections.setdefault(key, cls)
    return dataclasses.make_dataclass("PeftSections", [(k, c, dataclasses.field(default_factory=c))
                                                       for k, c in sections.items()])


PeftSections = _sections_dataclass()


def default_lr(name: str) -> float:
    return get_method(name).default_lr


def apply_method(model: nn.Module, name: str, cfg=None, tokenizer=None) -> nn.Module:
    """Apply method `name` to `model` in place (module swaps, freezing). `cfg` holds the method's
    config sections as attributes (e.g. a FinetuneConfig, or default_sections(name, lora=...));
    None: every section at its defaults."""
    method = get_method(name)
    return method.apply(model, cfg if cfg is not None else default_sections(method), tokenizer)


def adapter_method(model: nn.Module) -> str | None:
    """The name of the adapter method the model carries (lora, prompt, ...), or None."""
    method = detect(model)
    return method.name if method else None


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None, force: bool = False,
                 extra: dict | None = None, method: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (only the adapter tensors), atomically.
    method: the record to save with (default: the one the model carries)."""
    from safetensors.torch import save_file

    rec = get_method(method) if method is not None else detect(model)
    if rec is None or not rec.saves_adapter:
        raise LLMKitError("model carries no adapter to save (full and selective fine-tuning save a checkpoint)")
    config = rec.peft_config(model, base_model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in rec.state(model).items()}
    out = Path(out_dir)
    with atomic_dir(out, force=force, owns=MODEL_FILES) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        facts = {"method": rec.name, **rec.extra, **(extra or {})}
        (tmp / EXTRA_FILE).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    d = Path(adapter_dir)
    p = d / CONFIG_FILE
    if not d.is_dir():
        raise LLMKitError(f"adapter directory not found: {d}")
    if not p.is_file():
        raise LLMKitError(f"{d} is not an adapter directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise LLMKitError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise LLMKitError(f"{p} has no peft_type")
    return cfg


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = d / WEIGHTS_FILE
    if not p.is_file():
        if (d / "adapter_model.bin").is_file():
            raise LLMKitError(f"{d} holds adapter_model.bin (pickle, not loaded for safety); save it as safetensors")
        raise LLMKitError(f"{d} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LLMKitError(f"{p} is not a readable safetensors file ({e})") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the module swaps named by adapter_dir/adapter_config.json to `model` and load the adapter
    weights (files written by llmkit or by `peft`). An adapter made for another base model (a target
    module that does not exist, or a tensor shape mismatch) raises LLMKitError."""
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    weights = _read_weights(d)
    method = for_peft_type(cfg["peft_type"])
    try:
        method.from_peft_config(model, cfg)
    except LLMKitError as e:
        raise LLMKitError(f"adapter {d} does not fit this model (made for another base model?): {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a field of the wrong type or missing
        raise LLMKitError(f"{d / CONFIG_FILE} is not a valid {cfg['peft_type']} config ({type(e).__name__}: {e})") from None
    try:
        method.load_state(model, weights)
    except LLMKitError as e:
        raise LLMKitError(f"adapter {d} {e}") from None
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapter's swaps (folded into the weights first when merge=True). Adapters that
    cannot be merged (prompt, LLaMA-Adapter, bottleneck) raise LLMKitError when merge=True."""
    method = detect(model)
    if method is None:
        return model
    if merge and not method.mergeable:
        raise LLMKitError(f"a {method.name} adapter adds computation that cannot be folded into the weights; "
                          "use the base model with --adapter instead of merging")
    return method.unload(model, merge)


def can_disable(model: nn.Module) -> bool:
    """Whether `disabled(model)` works: the model carries an adapter whose method can switch it off."""
    method = detect(model)
    return method is not None and method.set_enabled is not None


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block the model computes as its base model: the adapter's contribution is switched
    off (no weights are copied or changed) and switched back on afterwards, also on an exception.
    A model without an adapter, or with one whose method cannot be switched off, raises LLMKitError."""
    method = detect(model)
    if method is None or method.set_enabled is None:
        what = f"a {method.name} adapter" if method else "no adapter"
        raise LLMKitError(f"the model carries {what}, which cannot be switched off to give the base model")
    method.set_enabled(model, False)
    try:
        yield model
    finally:
        method.set_enabled(model, True)
