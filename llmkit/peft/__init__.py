"""Parameter-efficient fine-tuning as module swaps on the one Transformer.

    apply_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)       # lora.py
    quantize_model_nf4(model); apply_lora(model, ...)                     # QLoRA (nf4.py)
    apply_adapters(model, bottleneck=64)                                  # adapters.py
    apply_prompt_tuning(model, n_tokens=20)                               # prompt_tuning.py
    apply_llama_adapter(model, adapter_len=10, n_layers=8)                # llama_adapter.py
    select_trainable(model, top_n_layers=2)                               # selective.py

`save_adapter(model, dir)` writes only the method's tensors (adapter_model.safetensors) and an
adapter_config.json in `peft`'s format; `load_adapter(model, dir)` applies the swaps that config
names to a base model and loads the tensors (also adapters written by `peft`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..io import atomic_dir
from .adapters import AdapterWrapped, adapters_config, apply_adapters, unload_adapters
from .common import from_peft_key, to_peft_key, trainable_summary
from .llama_adapter import AdaptedAttention, apply_llama_adapter, llama_adapter_peft_config, unload_llama_adapter
from .lora import LoRAConfig, LoRALinear, apply_lora, lora_peft_config, merge_lora, unload_lora, unmerge_lora
from .nf4 import NF4Linear, memory_report, quantize_model_nf4
from .prompt_tuning import (SoftPrompt, apply_prompt_tuning, load_prompt_state, nearest_tokens,
                            prompt_peft_config, prompt_state, unload_prompt_tuning)
from .selective import select_trainable

__all__ = ["apply_lora", "LoRAConfig", "LoRALinear", "merge_lora", "unmerge_lora", "unload_lora",
           "quantize_model_nf4", "NF4Linear", "memory_report", "apply_adapters", "apply_prompt_tuning",
           "nearest_tokens", "apply_llama_adapter", "select_trainable", "trainable_summary",
           "save_adapter", "load_adapter", "adapter_method", "unload", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "llmkit_adapter.json"  # llmkit-only facts (e.g. trained on an NF4 base) kept out of peft's config


def adapter_method(model: nn.Module) -> str | None:
    """Which PEFT method the model carries: lora | llama-adapter | prompt | adapter | None."""
    found = []
    mods = list(model.modules())
    if any(isinstance(m, LoRALinear) for m in mods):
        found.append("lora")
    if any(isinstance(m, AdaptedAttention) for m in mods):
        found.append("llama-adapter")
    if any(isinstance(m, SoftPrompt) for m in mods):
        found.append("prompt")
    if any(isinstance(m, AdapterWrapped) for m in mods):
        found.append("adapter")
    if len(found) > 1:
        raise LLMKitError(f"model carries several adapter kinds ({', '.join(found)}); save them one at a time")
    return found[0] if found else None


def adapter_state(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter, under the keys of the saved file (peft's where one exists)."""
    sd = model.state_dict()
    if method == "lora":
        return {to_peft_key(k): v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
    if method == "llama-adapter":
        return {to_peft_key(k): v for k, v in sd.items() if k.rsplit(".", 1)[-1].startswith("adaption_")}
    if method == "prompt":
        return prompt_state(model)
    if method == "adapter":
        return {k: v for k, v in sd.items() if ".adapter." in k}
    raise LLMKitError(f"unknown adapter method {method!r}")


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None, force: bool = False,
                 extra: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (only the adapter tensors), atomically."""
    from safetensors.torch import save_file

    method = adapter_method(model)
    if method is None:
        raise LLMKitError("model carries no adapter to save (full and selective fine-tuning save a checkpoint)")
    config = {"lora": lora_peft_config, "llama-adapter": llama_adapter_peft_config, "prompt": prompt_peft_config,
              "adapter": lambda m, b: adapters_config(m)}[method](model, base_model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state(model, method).items()}
    out = Path(out_dir)
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXTRA_FILE).write_text(json.dumps({"method": method, **(extra or {})}, indent=2, default=str) + "\n")
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
    kind = cfg["peft_type"]
    try:
        if kind == "LORA":
            targets = cfg.get("target_modules") or None
            if isinstance(targets, str) and targets != "all-linear":
                raise LLMKitError(f"regex target_modules {targets!r} are not supported; list the module names")
            apply_lora(model, targets=targets, r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                       dropout=float(cfg.get("lora_dropout", 0.0)), rslora=bool(cfg.get("use_rslora", False)))
        elif kind == "ADAPTION_PROMPT":
            apply_llama_adapter(model, adapter_len=int(cfg["adapter_len"]), n_layers=int(cfg["adapter_layers"]))
        elif kind == "PROMPT_TUNING":
            if int(cfg.get("token_dim", model.cfg.d_model)) != model.cfg.d_model:
                raise LLMKitError(f"soft prompt width {cfg['token_dim']} != model width {model.cfg.d_model}")
            unload_prompt_tuning(model)
            apply_prompt_tuning(model, n_tokens=int(cfg["num_virtual_tokens"]))
        elif kind == "LLMKIT_BOTTLENECK":
            apply_adapters(model, bottleneck=int(cfg["bottleneck"]), where=tuple(cfg.get("where", ("self_attn", "mlp"))))
        else:
            raise LLMKitError(f"unsupported adapter type {kind!r} (supported: LORA, ADAPTION_PROMPT, PROMPT_TUNING, "
                              "LLMKIT_BOTTLENECK)")
    except LLMKitError as e:
        raise LLMKitError(f"adapter {d} does not fit this model (made for another base model?): {e}") from None
    _load_tensors(model, weights, d, prompt=kind == "PROMPT_TUNING")
    return model


def _load_tensors(model: nn.Module, weights: dict[str, torch.Tensor], d: Path, prompt: bool) -> None:
    own = dict(model.named_parameters())
    if prompt:
        try:
            load_prompt_state(model, weights)
        except LLMKitError as e:
            raise LLMKitError(f"adapter {d}: {e}") from None
        return
    weights = {from_peft_key(k): v for k, v in weights.items()}
    expected = {n for n, p in own.items() if p.requires_grad}  # the adapter's own (fresh) parameters
    missing = sorted(expected - weights.keys())
    if missing:
        raise LLMKitError(f"adapter {d} lacks tensor {missing[0]!r} (and {len(missing) - 1} more): "
                          "it was made for another base model or another adapter configuration")
    with torch.no_grad():
        for k, v in weights.items():
            if k not in own:
                raise LLMKitError(f"adapter {d} has tensor {k!r} that this model does not have: "
                                  "it was made for another base model")
            p = own[k]
            if p.shape != v.shape:
                raise LLMKitError(f"adapter {d} was made for another base model: {k} has shape {tuple(v.shape)}, "
                                  f"this model needs {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter swap (LoRA merged into the weights first when merge=True). Adapters that
    cannot be merged (prompt, LLaMA-Adapter, bottleneck) raise LLMKitError when merge=True."""
    method = adapter_method(model)
    if method == "lora":
        return unload_lora(model, merge=merge)
    if method is not None and merge:
        raise LLMKitError(f"a {method} adapter adds computation that cannot be folded into the weights; "
                          "use the base model with --adapter instead of merging")
    unload_llama_adapter(model)
    unload_adapters(model)
    unload_prompt_tuning(model)
    return model
