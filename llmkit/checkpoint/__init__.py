"""Checkpoint I/O: Hugging Face format, GGUF, and llmkit checkpoints (HF format + llmkit.json).

An llmkit checkpoint is a directory any HF tool can read (config.json, model.safetensors,
tokenizer files) plus llmkit.json holding the exact ModelConfig and run metadata (the resolved
config of the run that made it). Written atomically: a crash leaves the previous one intact.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import LLMKitError
from ..io import atomic_dir
from ..models import ModelConfig, Transformer
from .gguf import load_gguf
from .hf import config_from_hf, config_to_hf, load_hf_model, read_config_json, save_hf_model

META_FILE = "llmkit.json"

__all__ = ["save_checkpoint", "load_checkpoint", "load_hf_model", "save_hf_model", "load_gguf",
           "config_from_hf", "config_to_hf", "is_checkpoint", "META_FILE"]


def save_checkpoint(model: Transformer, out_dir: str | Path, tokenizer=None, meta: dict | None = None,
                    force: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write an llmkit checkpoint directory atomically; refuses to overwrite unless force."""
    out = Path(out_dir)
    with atomic_dir(out, force=force) as tmp:
        save_hf_model(model, tmp, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        info = {"format": "llmkit", "llmkit_version": __version__, "model_config": model.cfg.to_dict(),
                "meta": meta or {}}
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
    cfg = ModelConfig.from_dict(info["model_config"])
    return load_hf_model(d, cfg), info.get("meta", {})
