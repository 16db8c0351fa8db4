"""Resolve a `--model` argument to (model, tokenizer).

Accepted everywhere: a registry name (pulled on first use), a GGUF file, a Hugging Face model
directory (config.json + safetensors), or an llmkit checkpoint directory. BERT encoders (a registry
encoder or a folder whose config.json says model_type "bert") load with `load_encoder`; each loader
refuses the other kind with a one-line error (an encoder cannot generate, a decoder has no masks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import LLMKitError
from .hub import REGISTRY, pull


def resolve(spec: str) -> tuple[str, Path]:
    """-> (kind, path) with kind in {"gguf", "hf", "checkpoint"}."""
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        if entry.kind != "gguf":
            raise LLMKitError(_ENCODER_NOT_LM.format(spec))
        return "gguf", pull(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        if "/" not in spec and not spec.endswith((".gguf", ".safetensors")):
            from .errors import closest

            raise LLMKitError(f"unknown model {spec!r}{closest(spec, REGISTRY)}; known models: {', '.join(REGISTRY)} "
                              "(or give a GGUF file, an HF model directory or an llmkit checkpoint)")
        raise LLMKitError(f"model path not found: {p}")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", p
        raise LLMKitError(f"{p} is not a GGUF file, an HF model directory or an llmkit checkpoint")
    from .checkpoint import is_checkpoint

    if is_checkpoint(p):
        return "checkpoint", p
    if (p / "config.json").exists():
        if is_encoder_dir(p):
            raise LLMKitError(_ENCODER_NOT_LM.format(p))
        return "hf", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise LLMKitError(f"{p} is not an HF model directory (no config.json), an llmkit checkpoint or a GGUF file")


_ENCODER_NOT_LM = ("{} is a BERT encoder, not a language model: it cannot generate text "
                   "(use `llmkit embed` or `llmkit fill-mask`)")


def is_encoder_dir(p: Path) -> bool:
    """A Hugging Face folder of a BERT encoder (config.json model_type "bert")."""
    import json

    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_encoder(spec: str) -> Path:
    """The folder of a BERT encoder: a registry encoder (pulled on first use) or a BERT folder; a decoder
    (GGUF, llmkit checkpoint, another HF architecture) is refused."""
    if spec in REGISTRY:
        if REGISTRY[spec].kind != "encoder":
            raise LLMKitError(f"{spec!r} is a decoder language model, not a BERT encoder")
        return pull(spec, quiet=True)
    p = Path(spec).expanduser()
    if not p.exists():
        from .errors import closest

        names = [n for n, e in REGISTRY.items() if e.kind == "encoder"]
        raise LLMKitError(f"encoder not found: {spec!r}{closest(spec, names)} (a registry encoder: "
                          f"{', '.join(names)}, or a BERT folder)")
    if not is_encoder_dir(p):
        raise LLMKitError(f"{p} is not a BERT encoder (a decoder language model or another format): "
                          "give a BERT folder, e.g. minilm-l6-v2")
    return p


def load_encoder(spec: str):
    """-> (Encoder in eval mode, its Tokenizer)."""
    from .models.encoder import Encoder
    from .tokenizer import Tokenizer

    p = resolve_encoder(spec)
    return Encoder.from_dir(p), Tokenizer.from_dir(p)


def load_tokenizer(kind: str, path: Path, gguf_meta: dict | None = None):
    from .tokenizer import Tokenizer

    if kind == "gguf":  # reuse the metadata already parsed with the weights (parsing takes seconds)
        return Tokenizer.from_gguf_metadata(gguf_meta, source=str(path)) if gguf_meta else Tokenizer.from_gguf(path)
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_dir(path)
    return None


def _converted_gguf(path: Path, quantized: bool = False) -> Path | None:
    """A GGUF converted once to an llmkit checkpoint (safetensors + tokenizer.json) in the cache: the
    quantized form (`load_gguf(quantized=True)`: int4/int8 tensors as llmkit.quant stores them) or,
    for an explicit float32 load, the dequantized fp32 one.

    Parsing GGUF metadata and reading its blocks take seconds for SmolLM2 (~10 s dequantising to fp32);
    the converted copy loads in a fraction of that. Keyed by the file's name, size and mtime (the
    quantized form with a "-q" suffix); LLMKIT_NO_CONVERT_CACHE=1 disables it.
    """
    import os

    from .checkpoint import is_checkpoint, load_gguf, save_checkpoint
    from .hub import cache_dir
    from .io import WriteError
    from .tokenizer import Tokenizer

    if os.environ.get("LLMKIT_NO_CONVERT_CACHE"):
        return None
    st = path.stat()
    out = cache_dir() / "converted" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}{'-q' if quantized else ''}"
    if is_checkpoint(out):
        return out
    model, meta = load_gguf(path, quantized=quantized)
    tok = Tokenizer.from_gguf_metadata(meta, source=str(path))
    try:
        save_checkpoint(model, out, tok, meta={"converted_from": str(path)}, force=True)
    except (OSError, WriteError):  # read-only or full cache: just load from the GGUF each time
        return None
    return out


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu", adapter: str | None = None,
               with_tokenizer: bool = True, quant: str | None = None):
    """-> (Transformer in eval mode, Tokenizer or None). A quantized checkpoint loads straight into
    quantized modules; `quant` quantizes on the fly (llmkit.quant.quantize) before the adapter is
    applied, so the adapter sits on the quantized base as in QLoRA.

    dtype None (the default) keeps a GGUF's quantized weights quantized (`load_gguf(quantized=True)`:
    int4/int8 QuantLinears, a QuantEmbedding, the rest fp32) when it runs on the CPU, where the
    kernels are; any other model loads in fp32. An explicit dtype (float32 for the exact dequantised
    weights; callers that train, merge, prune or re-quantize ask for it), or `quant`, loads a GGUF
    dequantised and casts to it."""
    from .checkpoint import load_checkpoint, load_gguf, load_hf_model

    kind, path = resolve(spec)
    meta = None
    quantized = kind == "gguf" and dtype is None and not quant and torch.device(device).type == "cpu"
    if kind == "gguf" and with_tokenizer:
        converted = _converted_gguf(path, quantized)
        if converted is not None:
            kind, path = "checkpoint", converted
    if kind == "gguf":
        model, meta = load_gguf(path, quantized=quantized)
    elif kind == "checkpoint":
        model, _ = load_checkpoint(path)
    else:
        model = load_hf_model(path)
    if quant:
        from .quant import quantize

        quantize(model, quant)
    if adapter:
        from .peft import load_adapter

        model = load_adapter(model, adapter)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer = load_tokenizer(kind, path, meta) if with_tokenizer else None
    return model, tokenizer
