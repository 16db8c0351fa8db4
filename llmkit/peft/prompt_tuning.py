"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

n learnable "virtual token" vectors P (n, C) are prepended to the input embeddings; the whole model
stays frozen and only P is trained. The soft prompt is attached to the model as `model.soft_prompt`
and fed through the model's `embeds=` argument: embeds = [P; E[idx]] (B, n+T, C); the logits of the
n prompt positions are dropped. Initialised from the embeddings of random vocabulary tokens, or of a
text (sec. 3.2). One prompt per task can be saved and swapped in at inference (`load_adapter`).
Saved as `prompt_embeddings` (n, C), the key `peft` uses for PROMPT_TUNING.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .common import freeze, load_trainable
from .registry import PeftMethod, register


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


def prompt_peft_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    cfg = model.cfg
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "num_virtual_tokens": model.soft_prompt.n_tokens, "token_dim": cfg.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": cfg.n_head, "num_layers": cfg.n_layer,
            "prompt_tuning_init": "RANDOM", "inference_mode": True}


# ---------------------------------------------------------------- the record's interface
# The prompt-tuning record below calls only these functions (and apply_prompt_tuning,
# prompt_peft_config, nearest_tokens above), whatever object holds the soft prompt.
def has_prompt(model: nn.Module) -> bool:
    return has_soft_prompt(model)


def prompt_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": P (n, C)}: peft's key for PROMPT_TUNING."""
    return {"prompt_embeddings": model.soft_prompt.weight.detach()}


def load_prompt_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy a saved P (n, C) into the model's (freshly applied) soft prompt."""
    if "prompt_embeddings" not in weights:
        raise LLMKitError("has no prompt_embeddings tensor")
    load_trainable(model, {"soft_prompt.weight": weights["prompt_embeddings"]})


def unload_prompt_tuning(model: nn.Module) -> nn.Module:
    if has_soft_prompt(model):
        del model.soft_prompt
    return model


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
    supports_packing=False,  # the soft prompt is prepended to each row, not to each packed document
    peft_type="PROMPT_TUNING", is_applied=has_prompt, state=prompt_state, load_state=load_prompt_state,
    peft_config=prompt_peft_config, from_peft_config=_from_peft_config, unload=_unload, summary=_summary))
