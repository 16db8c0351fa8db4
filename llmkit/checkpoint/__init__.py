"""Checkpoint I/O: Hugging Face format, GGUF, and llmkit checkpoints (HF format + llmkit.json).

An llmkit checkpoint is a directory any HF tool can read (config.json, model.safetensors,
tokenizer files) plus llmkit.json holding the exact ModelConfig and run metadata (the resolved
config of the run that made it). Written atomically: a crash leaves the previous one intact.

A quantized checkpoint (`llmkit quantize`) holds the quantized tensors (`QuantLinear`'s state dict)
and llmkit.json records which method each layer uses ("quantization"). It is loaded the gpt-fast
way: the model is built on the meta device, the recorded layers are swapped for empty QuantLinears
and the state dict is assigned into them, so no full-precision copy of the weights ever exists.
HF tools cannot read its quantized tensors.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .. import __version__
from ..errors import LLMKitError
from ..io import MODEL_FILES, atomic_dir
from ..models import ModelConfig, Transformer
from .gguf import load_gguf
from .gguf_export import save_gguf
from .hf import (OTHER_LOADERS, config_from_hf, config_to_hf, load_hf_model, load_quantized_state, read_config_json,
                 save_hf_model, state_dict_from_hf, weight_files)

META_FILE = "llmkit.json"

__all__ = ["save_checkpoint", "load_checkpoint", "load_hf_model", "save_hf_model", "load_gguf", "save_gguf",
           "config_from_hf", "config_to_hf", "is_checkpoint", "META_FILE"]


def save_checkpoint(model: Transformer, out_dir: str | Path, tokenizer=None, meta: dict | None = None,
                    force: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write an llmkit checkpoint directory atomically; refuses to overwrite unless force."""
    from ..quant import quantized_layers

    out = Path(out_dir)
    layers = quantized_layers(model)
    if layers and model.cfg.pos_emb == "learned":
        raise LLMKitError("quantized checkpoints are written for LLaMA-like models (GPT-2's fused c_attn "
                          "layout is not supported)")
    with atomic_dir(out, force=force, owns=MODEL_FILES) as tmp:
        save_hf_model(model, tmp, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        info = {"format": "llmkit", "llmkit_version": __version__, "model_config": model.cfg.to_dict(),
                "meta": meta or {}}
        if layers:  # the method of most layers names the checkpoint; each layer's own is recorded
            info["quantization"] = {"method": Counter(layers.values()).most_common(1)[0][0], "layers": layers}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def is_checkpoint(d: str | Path) -> bool:
    return (Path(d) / META_FILE).is_file()


def read_meta(d: str | Path) -> dict:
    p = Path(d) / META_FILE
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise LLMKitError(f"{p} is not valid JSON ({e})") from None


def load_checkpoint(d: str | Path) -> tuple[Transformer, dict]:
    """Load an llmkit checkpoint (exact ModelConfig from llmkit.json) -> (model, meta)."""
    info = read_meta(d)
    if "model_config" not in info:
        raise LLMKitError(f"{Path(d) / META_FILE} has no model_config")
    if info["model_config"].get("family") in OTHER_LOADERS:  # e.g. a T5: its HF folder says it all
        return load_hf_model(d), info.get("meta", {})
    cfg = ModelConfig.from_dict(info["model_config"])
    if info.get("quantization"):
        return load_quantized(Path(d), cfg, info["quantization"]), info.get("meta", {})
    return load_hf_model(d, cfg), info.get("meta", {})


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors_copy(d: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors read into fresh (64-byte aligned, anonymous) memory with plain reads.

    Why not safetensors' load_file: it maps the file, and every page a tensor touches stays in the
    process's RSS for as long as any tensor of the file lives; tensors converted on load (int4's CPU
    packing) would then be counted twice. Format: 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}}, then the data."""
    import struct

    files = weight_files(d)
    out: dict[str, torch.Tensor] = {}
    for name in files:
        p = d / name
        try:
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                start = 8 + n
                for key, t in header.items():
                    if key == "__metadata__":
                        continue
                    b, e = t["data_offsets"]
                    buf = torch.empty(e - b, dtype=torch.uint8)
                    f.seek(start + b)
                    if f.readinto(memoryview(buf.numpy())) != e - b:
                        raise ValueError(f"tensor {key} is truncated")
                    out[key] = buf.view(_ST_DTYPES[t["dtype"]]).reshape(t["shape"])
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise LLMKitError(f"{p} is not a readable safetensors file ({e})") from None
    return out


def load_quantized(d: Path, cfg: ModelConfig, quantization: dict) -> Transformer:
    """Meta-device model -> empty QuantLinears for the recorded layers -> assign the stored tensors."""
    sd = state_dict_from_hf(read_safetensors_copy(d), cfg)
    return load_quantized_state(cfg, quantization.get("layers"), sd, str(d))
