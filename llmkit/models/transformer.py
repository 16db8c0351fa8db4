"""The decoder-only transformer: one class for every family, configured by `ModelConfig`.

Module names follow Hugging Face LLaMA (embed_tokens, layers.i.self_attn.q_proj, mlp.gate_proj,
input_layernorm, norm, lm_head) so checkpoints and PEFT adapters map one to one.

`prefix` is an optional slot for learned vectors in front of every sequence (a prompt-tuning soft
prompt): a module with `weight` (n, C). The forward owns it, so callers never test for it: the prefix
takes positions 0..n-1, the caller's tokens keep their positions 0..T-1 as seen from outside (n..n+T-1
inside), attention masks gain the prefix's columns, its outputs are dropped, and `new_cache` puts its
K/V into the first n slots of every cache. It costs n positions of the context window (`max_tokens`).

`mtp` holds cfg.mtp_depth multi-token prediction modules (DeepSeek-V3, arXiv:2412.19437, sec. 2.2),
sharing the embedding and output head: module k reads the previous depth's hidden state at position i
and the embedding of token i+k, and predicts token i+k+1. In training `mtp_loss` adds their
cross-entropy (from the hidden states the last forward kept); at inference they draft tokens for
self-speculative decoding (`llmkit.inference.generate.mtp_generate`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..losses import cross_entropy, load_balancing_loss
from .config import ModelConfig
from .modules import Block, Dropout, attention_class, make_norm, rope_cache, rope_for_heads

# models with a context window of at most this many positions build their rope table for the whole
# window on first use (8192 x head size 64 x cos/sin: 4 MiB fp32); longer ones grow it with the positions
FULL_ROPE_TABLE = 8192


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_in_memory(cfg: ModelConfig, device: str | None = None) -> None:
    """A config whose fp32 weights cannot fit in this machine's available memory (a 10^12-token
    vocabulary in a corrupt config) is one line before any allocation, not an allocator's error.
    Models built on the meta device (loading straight into quantized modules) allocate nothing."""
    if torch.device(device or torch.get_default_device()).type != "cpu":
        return
    from .flops import num_params

    need, avail = num_params(cfg) * 4, _available_bytes()
    if avail is not None and need > avail:
        raise LLMKitError(f"a model of this config ({num_params(cfg):,} parameters) needs {need / 2**30:,.1f} GiB "
                          f"in fp32; this machine has {avail / 2**30:,.1f} GiB available")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_fits_in_memory(cfg)
        self.cfg = cfg
        # on the meta device (loading straight into quantized modules) skip nn.Embedding's own normal_
        # init: a meta normal_ runs a Python reference that imports torch._dynamo, ~1.9 s of cold start
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                         _weight=torch.empty(cfg.vocab_size, cfg.d_model) if meta else None)
        # GPT-2: h0 = U·We + Wp (learned absolute positions); others rotate q/k instead
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # P(u) = softmax(hn · Weᵀ)
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = (nn.ModuleList(MTPModule(cfg, cfg.n_layer + k) for k in range(cfg.mtp_depth))
                    if cfg.mtp_depth else None)
        self.mtp_hidden: torch.Tensor | None = None  # (B, T, C) of the last training forward, for mtp_loss
        self.prefix: nn.Module | None = None  # learned (n, C) vectors in front of every sequence, see above
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] | None = None  # see rope()
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
    def rope(self, input_pos: torch.Tensor, local: bool = False):
        """cos/sin rows for the given positions, computed lazily up to the largest position seen.
        local: the table of the sliding-window layers (their own base, cfg.rope_local_theta)."""
        tables = self._rope if self._rope is not None else {}  # {local: (cos, sin)}; None = not built yet
        have = tables.get(local)
        if have is not None and have[0].size(0) >= self.cfg.max_seq_len and have[0].device == input_pos.device:
            return have[0][input_pos], have[1][input_pos]  # the whole window: no position read (compiled decode)
        if self.cfg.max_seq_len <= FULL_ROPE_TABLE and have is None:
            need = self.cfg.max_seq_len  # the whole window at once: no position read (a torch.compile graph break)
        else:
            need = int(input_pos.max()) + 1
        if have is None or have[0].size(0) < need or have[0].device != input_pos.device:
            length = min(max(need, 2 * (have[0].size(0) if have else 0), 256), self.cfg.max_seq_len)
            cos, sin = rope_cache(self.cfg, max(length, need), local)
            tables[local] = (cos.to(input_pos.device), sin.to(input_pos.device))
            self._rope = tables
        cos, sin = tables[local]
        return cos[input_pos], sin[input_pos]

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.weight.size(0)

    @property
    def max_tokens(self) -> int:
        """Tokens a caller can feed: the context window less the prefix's positions."""
        return self.cfg.max_seq_len - self.n_prefix

    def decoder_for(self, prompts: list[list[int]]) -> tuple["Transformer", list[list[int]]]:
        """The decoder that continues `prompts` and the tokens it starts from (the generation engine's
        one seam for encoder-decoders, see models/t5.py): here the model itself and the prompts."""
        return self, prompts

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None, rolling: bool = False):
        """A KV cache for `max_len` caller positions in the layout of the model's attention
        (`Attention.new_cache`: full slots, or with rolling=True Mistral's rolling buffer), its first
        slots holding the prefix's K/V."""
        w = self.norm.weight  # the activations' dtype and device (a quantized embedding has no dense table)
        dtype, device = dtype or w.dtype, device or w.device
        n = self.n_prefix
        cache = attention_class(self.cfg).new_cache(self.cfg, batch_size, max_len + n, dtype=dtype, device=device,
                                                    rolling=rolling, offset=n)
        if n:
            with torch.no_grad():  # the prefix's K/V, once for every later forward on this cache
                x = self.prefix.weight.to(w.dtype)[None].expand(batch_size, -1, -1)
                self._blocks(x, torch.arange(n, device=device), n - 1, cache, None)
        return cache

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the MoE layers from the last forward (0 for dense models)."""
        logits = [r for m in self.modules() if (r := getattr(m, "router_logits", None)) is not None]
        if not logits:
            return torch.zeros(())
        return load_balancing_loss(logits, self.cfg.n_expert, self.cfg.n_expert_per_tok)

    def mtp_forward(self, depth: int, h: torch.Tensor, next_idx: torch.Tensor, input_pos: torch.Tensor,
                    cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (0-based) on h (B, T, C), the previous depth's hidden states at positions
        input_pos (T,), and next_idx (B, T) the tokens depth+1 ahead of them -> its hidden states
        (B, T, C) for the next depth and the logits (B, T, V) of the tokens depth+2 ahead."""
        if self.n_prefix:
            raise LLMKitError("multi-token prediction does not support a prefix (prompt tuning)")
        last = int(input_pos.max()) if cache is not None else h.size(1) - 1
        rope = rope_for_heads(*self.rope(input_pos)) if self.cfg.pos_emb == "rope" else None
        mask = self.attention_mask(input_pos, h.size(1), last, cache, None, h.device)
        out = self.mtp[depth](h, self.embed_tokens(next_idx), rope, mask, cache, input_pos)
        return out, self.lm_head(self.mtp[depth].norm(out))

    def mtp_loss(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """V3 eq. 24-25: mean over depths k = 1..D of the cross-entropy of token i+k+1 at position i,
        for the inputs and targets (B, T) of the last training forward (targets = inputs shifted by one;
        0 for a model without MTP). Module k sees h^{k-1}_i and Emb(t_{i+k}) for i < T - k."""
        if self.mtp is None or self.mtp_hidden is None:
            return torch.zeros(())
        h, idx = self.mtp_hidden, self.mtp_idx
        T = idx.size(1)
        losses = []
        for k in range(1, len(self.mtp) + 1):
            if T - k < 1:
                break
            h, logits = self.mtp_forward(k - 1, h[:, :T - k], idx[:, k:], torch.arange(T - k, device=idx.device))
            losses.append(cross_entropy(logits, targets[:, k:], ignore_index=ignore_index))
        self.mtp_hidden = None
        return torch.stack(losses).mean() if losses else torch.zeros((), device=idx.device)

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
        if self.cfg.embed_scale and embeds is None:  # Gemma: h0 = e * sqrt(C), the factor rounded to e's dtype
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        T = x.size(1)
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required when decoding with a cache")
            input_pos = torch.arange(T, device=x.device)
            last = T - 1  # known without reading a tensor (.item() would break a torch.compile graph)
        elif getattr(cache, "static", False):  # compiled decode: its caller checked the positions, read none here
            last = None
        else:
            last = int(input_pos.max())
        n = self.n_prefix
        if last is not None and last + n >= self.cfg.max_seq_len:
            raise LLMKitError(f"sequence of {last + 1} tokens is longer than the model's context window of "
                              f"{self.cfg.max_seq_len}" + (f" less its {n}-token prefix" if n else ""))
        if cache is not None and getattr(cache, "offset", 0) != n:
            raise LLMKitError("this KV cache was not built for this model's prefix: make it with model.new_cache")
        if n:
            input_pos = input_pos + n  # the prefix holds positions 0..n-1
            if cache is None:  # with a cache, the prefix's K/V are in its first slots already
                x, input_pos, attn_mask = self._prepend_prefix(x, input_pos, attn_mask)
            elif attn_mask is not None:  # the caller's columns start after the prefix slots, all visible
                attn_mask = torch.cat([attn_mask.new_ones(*attn_mask.shape[:-1], n), attn_mask], dim=-1)
        x = self._blocks(x, input_pos, None if last is None else last + n, cache, attn_mask)
        if n and cache is None:
            x = x[:, n:]  # drop the prefix's outputs
        x = self.norm(x)
        if self.mtp is not None and self.training and cache is None and idx is not None:
            self.mtp_hidden, self.mtp_idx = x, idx  # mtp_loss reads them (as aux_loss the router logits)
        if last_only:
            x = x[:, -1:]
        return x if return_hidden else self.lm_head(x)

    def _blocks(self, x: torch.Tensor, input_pos: torch.Tensor, last: int, cache, attn_mask) -> torch.Tensor:
        """Positions, dropout and the layers on x (B, T, C) at internal positions input_pos (T,) | (B, T)."""
        if self.embed_positions is not None:
            x = x + self.embed_positions(input_pos)
        x = self.dropout(x)
        cfg = self.cfg
        rope = rope_for_heads(*self.rope(input_pos)) if cfg.pos_emb == "rope" else None
        mask = self.attention_mask(input_pos, x.size(1), last, cache, attn_mask, x.device, cfg.uniform_window)
        # interleaved local/global layers (Gemma 3): the windowed layers get their own mask and rope table
        local = [cfg.local_layer(i) for i in range(len(self.layers))] if cfg.sliding_window_pattern else None
        if local and any(local):
            rope_l = rope_for_heads(*self.rope(input_pos, local=True)) if rope is not None and cfg.rope_local_theta else rope
            mask_l = self.attention_mask(input_pos, x.size(1), last, cache, attn_mask, x.device, cfg.sliding_window)
        for i, layer in enumerate(self.layers):
            if local and local[i]:
                x = layer(x, rope_l, mask_l, cache, input_pos)
            else:
                x = layer(x, rope, mask, cache, input_pos)
        return x

    def _prepend_prefix(self, x: torch.Tensor, input_pos: torch.Tensor, attn_mask: torch.Tensor | None):
        """[P; x] (B, n+T, C) with positions [0..n-1; input_pos]; an attn_mask (B|1, 1, T, T) grows to
        (B|1, 1, n+T, n+T): the prefix attends causally to itself only, every token also to the prefix."""
        B, T, _ = x.shape
        p = self.prefix.weight
        n = p.size(0)
        x = torch.cat([p.to(x.dtype)[None].expand(B, -1, -1), x], dim=1)
        head = torch.arange(n, device=x.device)
        input_pos = torch.cat([head if input_pos.dim() == 1 else head.expand(input_pos.size(0), -1), input_pos], -1)
        if attn_mask is not None:
            b = attn_mask.size(0)
            top = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            top = torch.cat([top, top.new_zeros(n, T)], dim=1).expand(b, 1, -1, -1)  # (b, 1, n, n+T)
            bottom = torch.cat([attn_mask.new_ones(b, 1, T, n), attn_mask], dim=-1)  # (b, 1, T, n+T)
            attn_mask = torch.cat([top, bottom], dim=2)
        return x, input_pos, attn_mask

    def attention_mask(self, input_pos: torch.Tensor, T: int, last: int, cache, attn_mask: torch.Tensor | None,
                       device, window: int | None = None) -> torch.Tensor | None:
        """The bool mask (B|1, 1, T, S) of layers with sliding window `window` (None: none), or None for
        plain causal attention (SDPA's is_causal path, no mask tensor; a non-causal attention then sees
        every key)."""
        W = window
        if cache is not None:
            mask = cache.mask(input_pos, W)  # the cache knows its layout (and applies the window)
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
        return None  # plain causal (or, for a non-causal attention, every key)


def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool: i attends to j iff i - W < j <= i (Mistral, Jiang et al. 2023)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return ((j <= i) & (i - j < window))[None, None]


class MTPModule(Block):
    """One multi-token prediction depth (DeepSeek-V3 sec. 2.2, eq. 21-23): a transformer block on
        h'_i = eh_proj([RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)])    (B, T, 2C) -> (B, T, C)
    with its own final norm before the shared output head. (The paper writes [h; Emb]; the released
    weights and vLLM concatenate the embedding first, so eh_proj is laid out that way.) Its block's
    layer index is n_layer + k - 1: its K/V sit in the cache after the main layers'."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm, self.hnorm = make_norm(cfg), make_norm(cfg)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.norm = make_norm(cfg)  # V3's shared_head.norm

    def forward(self, h, emb, rope, mask, cache=None, input_pos=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, rope, mask, cache, input_pos)
