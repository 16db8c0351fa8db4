"""Calibration for outlier-aware quantization: how large each linear's input features get on real text.

LLM.int8() (Dettmers et al. 2022, sec. 3.2) finds the outlier feature dimensions by their magnitude in the
hidden states (>= 6.0 in a few fixed dimensions from ~6.7B parameters on); a weight-only method only needs
the ranking, so this records, for every nn.Linear, the absmax of each input feature over the calibration
tokens: act_j = max over tokens |x_tj|, (K,). The text must not be the text the quantized model is
evaluated on (the trade-off table calibrates on tinyshakespeare and scores tinystories).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError

DEFAULT_TOKENS = 4096


def calibration_text(path: str | Path | None) -> str:
    """The calibration text: a file, or by default the first 100k characters of the packaged
    tinyshakespeare (the speedrun model's training part; never a held-out text)."""
    if path is None:
        path = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
        return path.read_text(encoding="utf-8")[:100_000]
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LLMKitError(f"cannot read calibration file {p} ({e})") from None
    if not text.strip():
        raise LLMKitError(f"calibration file {p} is empty")
    return text


@torch.inference_mode()
def activation_absmax(model: nn.Module, ids: list[int], seq_len: int = 512) -> dict[str, torch.Tensor]:
    """{linear name: (K,) fp32 max |x| per input feature} over `ids`, run in windows of seq_len tokens."""
    if len(ids) < 2:
        raise LLMKitError("calibration text has fewer than 2 tokens")
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, inp, out, name=name):
                a = inp[0].detach().abs().reshape(-1, inp[0].size(-1)).amax(0).float()  # (K,)
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(m.register_forward_hook(hook))
    try:
        x = torch.as_tensor(ids, dtype=torch.long)
        T = min(seq_len, model.max_tokens)
        for i in range(0, len(ids), T):
            model(x[i:i + T][None])
    finally:
        for h in hooks:
            h.remove()
    return stats


def calibrate(model: nn.Module, tokenizer, text: str | None = None, tokens: int = DEFAULT_TOKENS,
              seq_len: int = 512) -> dict[str, torch.Tensor]:
    """activation_absmax over the first `tokens` tokens of `text` (default: `calibration_text(None)`)."""
    if tokenizer is None:
        raise LLMKitError("calibration needs the model's tokenizer")
    if tokens < 2:
        raise LLMKitError(f"calibration needs at least 2 tokens, got --calibration-tokens {tokens}")
    return activation_absmax(model, tokenizer.encode(text if text is not None else calibration_text(None))[:tokens],
                             seq_len)
