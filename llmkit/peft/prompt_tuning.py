"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

n learnable "virtual token" vectors P (n, C) are put in front of the input embeddings; the whole model
stays frozen and only P is trained. P is a `SoftPrompt` in the model's generic `prefix` slot
(`Transformer.prefix`), so the model's forward owns it: it prepends P, gives it positions 0..n-1 and
the real tokens n.., drops its outputs, and `model.new_cache` puts its K/V into every KV cache. Callers
(generate, score, eval, finetune) see the usual logits of their tokens and never test for it. The n
virtual tokens take n of the context window's positions (`model.max_tokens` = context - n).
Initialised from the embeddings of random vocabulary tokens, or of a text (sec. 3.2). One prompt per
task can be saved and swapped in at inference. Saved as `prompt_embeddings` (n, C), the key `peft`
uses for PROMPT_TUNING.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .common import freeze
from .registry import PeftMethod, register


class SoftPrompt(nn.Module):
    """weight: (n, C) virtual token embeddings; the model's forward reads `prefix.weight`."""

    def __init__(self, n_tokens: int, dim: int, init: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        w = torch.empty(n_tokens, dim, device=device, dtype=dtype)
        if init is not None:
            w.copy_(init)
        else:
            nn.init.normal_(w, std=0.02)
        self.weight = nn.Parameter(w)

    @property
    def n_tokens(self) -> int:
        return self.weight.size(0)


def apply_prompt_tuning(model: nn.Module, n_tokens: int = 20, init_ids: list[int] | None = None,
                        seed: int = 0) -> nn.Module:
    """Freeze the model and put a soft prompt of n_tokens vectors in its prefix slot, initialised from
    the embeddings of `init_ids` (repeated to length n) or of random vocabulary tokens."""
    if n_tokens <= 0:
        raise LLMKitError(f"prompt tuning: n_tokens must be positive, got {n_tokens}")
    if n_tokens >= model.cfg.max_seq_len:
        raise LLMKitError(f"prompt tuning: {n_tokens} virtual tokens leave no room in the context window "
                          f"of {model.cfg.max_seq_len}")
    freeze(model)
    emb = model.embed_tokens.weight
    if init_ids:
        ids = torch.tensor((list(init_ids) * n_tokens)[:n_tokens])
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(emb.size(0), 5000), (n_tokens,), generator=g)
    model.prefix = SoftPrompt(n_tokens, emb.size(1), init=emb.detach()[ids.to(emb.device)].clone(),
                              device=emb.device, dtype=emb.dtype)
    return model


def has_prompt(model: nn.Module) -> bool:
    return isinstance(getattr(model, "prefix", None), SoftPrompt)


def prompt_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved tensors: {"prompt_embeddings": (n, C)} (peft's key)."""
    return {"prompt_embeddings": model.prefix.weight.detach()}


def load_prompt_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Put saved `prompt_embeddings` (n, C) into the model's prompt (applied with the same n)."""
    if "prompt_embeddings" not in weights:
        raise LLMKitError("the adapter file has no prompt_embeddings tensor")
    w, own = weights["prompt_embeddings"], model.prefix.weight
    if w.shape != own.shape:
        raise LLMKitError(f"prompt_embeddings has shape {tuple(w.shape)}, this model's prompt needs {tuple(own.shape)}")
    with torch.no_grad():
        own.copy_(w.to(own.dtype))
    return model


def unload_prompt_tuning(model: nn.Module) -> nn.Module:
    """Empty the prefix slot: the plain model again."""
    if has_prompt(model):
        model.prefix = None
    return model


@torch.no_grad()
def nearest_tokens(model: nn.Module, tokenizer=None) -> list[tuple[int, int, str, float]]:
    """For each prompt vector: (position, nearest vocabulary id by cosine similarity, its text, cosine)."""
    p = F.normalize(model.prefix.weight.float(), dim=-1)  # (n, C)
    e = F.normalize(model.embed_tokens.weight.float(), dim=-1)  # (V, C)
    cos, ids = (p @ e.T).max(dim=-1)
    out = []
    for i, (t, c) in enumerate(zip(ids.tolist(), cos.tolist())):
        text = tokenizer.id_to_token(t) if tokenizer is not None else str(t)
        out.append((i, t, text, c))
    return out


def prompt_peft_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    cfg = model.cfg
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "num_virtual_tokens": model.prefix.n_tokens, "token_dim": cfg.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
            "prompt_tuning_init": "RANDOM", "inference_mode": True}


# ---------------------------------------------------------------- the registered record
@dataclass
class PromptSection:
    """The `prompt:` section of a fine-tuning config."""

    n_tokens: int = 20
    init_text: str | None = None  # initialise from this text's token embeddings (else random tokens)


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    p = cfg.prompt
    init = tokenizer.encode(p.init_text, add_bos=False) if p.init_text and tokenizer is not None else None
    return apply_prompt_tuning(model, p.n_tokens, init_ids=init, seed=getattr(getattr(cfg, "train", cfg), "seed", 0))


def _from_peft_config(model: nn.Module, cfg: dict) -> None:
    if int(cfg.get("token_dim", model.cfg.d_model)) != model.cfg.d_model:
        raise LLMKitError(f"soft prompt width {cfg['token_dim']} != model width {model.cfg.d_model}")
    unload_prompt_tuning(model)  # one prompt per task: a loaded prompt replaces the current one
    apply_prompt_tuning(model, n_tokens=int(cfg["num_virtual_tokens"]))


def _unload(model: nn.Module, merge: bool = False) -> nn.Module:
    unload_prompt_tuning(model)
    return model


def _summary(model: nn.Module, tokenizer) -> dict:
    return {"prompt_nearest_tokens": [t for _, _, t, _ in nearest_tokens(model, tokenizer)]}


PROMPT = register(PeftMethod(
    name="prompt", default_lr=3e-2, apply=_apply, sections={"prompt": PromptSection},
    peft_type="PROMPT_TUNING", is_applied=has_prompt, state=prompt_state, load_state=load_prompt_state,
    peft_config=prompt_peft_config, from_peft_config=_from_peft_config, unload=_unload, summary=_summary))
