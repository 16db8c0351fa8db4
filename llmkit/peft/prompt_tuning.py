"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

n learnable "virtual token" vectors P (n, C) are prepended to the input embeddings; the whole model
stays frozen and only P is trained. The soft prompt is attached to the model as `model.soft_prompt`
and fed through the model's `embeds=` argument: embeds = [P; E[idx]] (B, n+T, C); the logits of the
n prompt positions are dropped. Initialised from the embeddings of random vocabulary tokens, or of a
text (sec. 3.2). One prompt per task can be saved and swapped in at inference (`load_adapter`).
Saved as `prompt_embeddings` (n, C), the key `peft` uses for PROMPT_TUNING.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .common import freeze


class SoftPrompt(nn.Module):
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
    """Freeze the model and attach a soft prompt of n_tokens vectors, initialised from the embeddings
    of `init_ids` (repeated to length n) or of random vocabulary tokens."""
    if n_tokens <= 0:
        raise LLMKitError(f"prompt tuning: n_tokens must be positive, got {n_tokens}")
    freeze(model)
    emb = model.embed_tokens.weight
    if init_ids:
        ids = torch.tensor((list(init_ids) * n_tokens)[:n_tokens])
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(emb.size(0), 5000), (n_tokens,), generator=g)
    model.soft_prompt = SoftPrompt(n_tokens, emb.size(1), init=emb.detach()[ids.to(emb.device)].clone(),
                                   device=emb.device, dtype=emb.dtype)
    return model


def has_soft_prompt(model: nn.Module) -> bool:
    return isinstance(getattr(model, "soft_prompt", None), SoftPrompt)


def prompt_embeds(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) -> [P; E[idx]] (B, n+T, C)."""
    x = model.embed_tokens(idx)
    p = model.soft_prompt.weight.to(x.dtype)[None].expand(idx.size(0), -1, -1)
    return torch.cat([p, x], dim=1)


def forward_with_prompt(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the real tokens, with the soft prompt in front."""
    n = model.soft_prompt.n_tokens
    return model(None, embeds=prompt_embeds(model, idx))[:, n:]


@torch.no_grad()
def nearest_tokens(model: nn.Module, tokenizer=None) -> list[tuple[int, int, str, float]]:
    """For each prompt vector: (position, nearest vocabulary id by cosine similarity, its text, cosine)."""
    p = F.normalize(model.soft_prompt.weight.float(), dim=-1)  # (n, C)
    e = F.normalize(model.embed_tokens.weight.float(), dim=-1)  # (V, C)
    cos, ids = (p @ e.T).max(dim=-1)
    out = []
    for i, (t, c) in enumerate(zip(ids.tolist(), cos.tolist())):
        text = tokenizer.id_to_token(t) if tokenizer is not None else str(t)
        out.append((i, t, text, c))
    return out


def unload_prompt(model: nn.Module) -> nn.Module:
    if has_soft_prompt(model):
        del model.soft_prompt
    return model


def prompt_peft_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    cfg = model.cfg
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "num_virtual_tokens": model.soft_prompt.n_tokens, "token_dim": cfg.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
            "prompt_tuning_init": "RANDOM", "inference_mode": True}
