"""The decoder-only transformer: one class for every family, configured by `ModelConfig`.

Module names follow Hugging Face LLaMA (embed_tokens, layers.i.self_attn.q_proj, mlp.gate_proj,
input_layernorm, norm, lm_head) so checkpoints and PEFT adapters map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..losses import load_balancing_loss
from .config import ModelConfig
from .modules import MoE, Block, Dropout, make_norm, rope_cache


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # GPT-2: h0 = U·We + Wp (learned absolute positions); others rotate q/k instead
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # P(u) = softmax(hn · Weᵀ)
            self.lm_head.weight = self.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_weights()

    # ------------------------------------------------------------ init
    def init_weights(self, std: float = 0.02):
        """GPT-2 init: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------ helpers
    def rope(self, input_pos: torch.Tensor):
        """cos/sin rows for the given positions, computed lazily up to the largest position seen."""
        need = int(input_pos.max()) + 1
        if self._rope is None or self._rope[0].size(0) < need or self._rope[0].device != input_pos.device:
            length = min(max(need, 2 * (self._rope[0].size(0) if self._rope else 0), 256), self.cfg.max_seq_len)
            cos, sin = rope_cache(self.cfg, max(length, need))
            self._rope = (cos.to(input_pos.device), sin.to(input_pos.device))
        cos, sin = self._rope
        return cos[input_pos], sin[input_pos]

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the MoE layers from the last forward (0 for dense models)."""
        logits = [m.router_logits for m in self.modules() if isinstance(m, MoE) and m.router_logits is not None]
        if not logits:
            return torch.zeros(())
        return load_balancing_loss(logits, self.cfg.n_expert, self.cfg.n_expert_per_tok)

    # ------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor | None, input_pos: torch.Tensor | None = None, cache=None,
                embeds: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids (or `embeds` (B, T, C)) -> logits (B, T, V).

        input_pos (T,) absolute positions shared by the rows, or (B, T) per row (default 0..T-1);
        required with a cache.
        attn_mask: bool (B|1, 1, T, S), True = query t may attend to key s; it replaces the causal mask
        (it must hold causality itself), e.g. a block-diagonal document mask for packed rows or a tree
        mask for shared-context scoring. Without a cache S = T; with one it is ANDed with the cache's
        mask (S = the cache's slots read). A sliding window, if the model has one, is applied on top
        in positions.
        last_only: only the last position's logits (B, 1, V), for decoding.
        return_hidden: the final normalised hidden states (B, T, C) instead of logits.
        """
        x = self.embed_tokens(idx) if embeds is None else embeds  # (B, T, C)
        T = x.size(1)
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required when decoding with a cache")
            input_pos = torch.arange(T, device=x.device)
            last = T - 1  # known without reading a tensor (.item() would break a torch.compile graph)
        else:
            last = int(input_pos.max())
        if last >= self.cfg.max_seq_len:
            raise LLMKitError(f"sequence of {last + 1} tokens is longer than the model's "
                              f"context window of {self.cfg.max_seq_len}")
        if self.embed_positions is not None:
            x = x + self.embed_positions(input_pos)
        x = self.dropout(x)
        rope = self.rope(input_pos) if self.cfg.pos_emb == "rope" else None
        mask = self.attention_mask(input_pos, T, last, cache, attn_mask, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask, cache, input_pos)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return x if return_hidden else self.lm_head(x)

    def attention_mask(self, input_pos: torch.Tensor, T: int, last: int, cache, attn_mask: torch.Tensor | None,
                       device) -> torch.Tensor | None:
        """The bool mask (B|1, 1, T, S) every layer uses, or None for plain causal attention (SDPA's
        is_causal path, no mask tensor)."""
        W = self.cfg.sliding_window
        if cache is not None:
            mask = cache.mask(input_pos)  # the cache knows its layout (and applies the window)
            if attn_mask is not None:
                mask = attn_mask if mask is None else mask & attn_mask
            return mask
        if attn_mask is not None:
            if W and last >= W:  # window in positions, so packed documents / tree branches keep their own
                i = input_pos[..., :, None]
                j = input_pos[..., None, :]
                near = (i - j < W)
                attn_mask = attn_mask & (near[None, None] if near.dim() == 2 else near[:, None])
            return attn_mask
        if W and T > W:
            return sliding_window_mask(T, W, device)
        return None  # plain causal

def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool: i attends to j iff i - W < j <= i (Mistral, Jiang et al. 2023)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return ((j <= i) & (i - j < window))[None, None]
