"""Building blocks of the decoder. Each is swappable: the config names one from a table below.

Shapes: B batch, T query length, S key length (cache size), C d_model, H query heads,
K key/value heads, D head dim, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError, closest
from .cache import BatchKVCache, RollingKVCache
from .config import ModelConfig


# ---------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019). Computed in fp32 like LLaMA."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as one torch call (torch's CPU kernel still runs several ops inside, but without
            # Python between them: cheaper than the 7-op formula below; a decode step makes 61 of these)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _layernorm(dim: int, eps: float = 1e-5, bias: bool = True):
    return nn.LayerNorm(dim, eps=eps, bias=bias)


NORMS = {"rmsnorm": RMSNorm, "layernorm": _layernorm}

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact erf GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
}


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    return NORMS[cfg.norm](dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------- rotary embeddings
def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2 (Su et al. 2021), with optional context scaling.
    local: the sliding-window layers' own base (cfg.rope_local_theta, never scaled: Gemma 3)."""
    d = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = {} if local and cfg.rope_local_theta else (cfg.rope_scaling or {})
    kind = sc.get("type") or sc.get("rope_type")
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return (inv_freq / sc["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, blended, scaled).float()
    raise LLMKitError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def rope_cache(cfg: ModelConfig, length: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape (length, D): cos with its halves duplicated (the rotate-half
    layout of HF LLaMA), sin as [-sin, sin] so that `apply_rope` needs one roll instead of a negation and a
    concatenation."""
    inv_freq = rope_inv_freq(cfg, local)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
    sin = emb.sin()
    sin[:, : inv_freq.numel()].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, T, D) from `rope_cache`. Rotates pairs (i, i + D/2):
    x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1] = roll(x, D/2)·[-1, 1], the sign folded
    into the table: 4 ops instead of 6 (chunk, neg, cat), fwd+bwd 3.5 -> 1.1 ms at (4, 9, 256, 64)."""
    if cos.dim() < 4:  # tables not yet shaped for the heads (a model's forward does it once: `rope_for_heads`)
        cos, sin = rope_for_heads(cos, sin)
    y = x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin
    return y if y.dtype == x.dtype else y.to(x.dtype)


def rope_for_heads(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) or (B, T, D) tables -> (1|B, 1, T, D), broadcast over heads: made once per forward rather
    than in each of the 2 x n_layer `apply_rope` calls (a decode step's dispatches are most of its time)."""
    if cos.dim() == 2:
        return cos[None, None], sin[None, None]
    return cos[:, None], sin[:, None]


# ---------------------------------------------------------------- fusing projections
@torch.no_grad()
def concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing cat([p(x) for p in parts], -1) for x (..., C): nn.Linear by concatenating
    the weights' rows; any other kind by its own `concat(parts)` classmethod (quantized linears stack
    their quantized rows, LoRA wrappers their adapters). None when the parts cannot be fused (mixed
    kinds, or a kind without `concat`): the caller keeps them separate."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is not nn.Linear:
        concat = getattr(kind, "concat", None)
        return concat(parts) if concat is not None else None
    w = parts[0].weight
    if any((p.bias is None) != (parts[0].bias is None) for p in parts):
        return None
    fused = nn.Linear(w.size(1), sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device=w.device, dtype=w.dtype)
    fused.weight.copy_(torch.cat([p.weight for p in parts]))
    if fused.bias is not None:
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.weight.requires_grad_(w.requires_grad)
    if fused.bias is not None:
        fused.bias.requires_grad_(parts[0].bias.requires_grad)
    return fused.train(parts[0].training)


# ---------------------------------------------------------------- attention
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention, kept in fp32 under CPU bf16 autocast: autocast runs the
    projections in bf16 (AMX) and would run SDPA in bf16 too, but torch's CPU flash-attention is slower
    in bf16 than in fp32 (fwd+bwd 19.5 vs 14.7 ms at B=8 H=6 T=256 D=32).

    One query per row without gradients (an eager decode step) on a CPU where llmkit's C kernels run
    (llmkit/quant/native.py: AVX2 without AVX-512) goes to their decode attention: the same values to fp32
    rounding, 1.3-2.6x as fast as torch's flash kernel there (benchmarks/matmul_bandwidth.py)."""
    if (q.size(-2) == 1 and q.device.type == "cpu" and not kw.get("is_causal") and not q.requires_grad
            and not k.requires_grad and not v.requires_grad and not torch.compiler.is_compiling()):
        from ..quant import native

        if native.available():
            out = native.attn_decode(q, k, v, kw.get("attn_mask"), kw.get("scale"))
            if out is not None:
                return out
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads (Ainslie et al. 2023; K=1 is MQA, Shazeer 2019).

    Causal unless cfg.causal is False (bidirectional, as in BERT's encoder, Devlin et al. 2019). The
    class also owns its cache layout (`new_cache`): K and V heads per layer, so a variant storing
    something else (MLA's latent, DeepSeek-AI 2024) brings its own.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = cfg.causal
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.qkv_proj = None  # set by fuse(): q, k, v in one matmul (inference only)
        # QK-norm (Dehghani et al. 2023; Gemma 3): RMSNorm over each head's D before RoPE keeps the
        # logits bounded; one (D,) gain shared by the heads
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        # Gemma scales scores by query_pre_attn_scalar^-1/2 (= D^-1/2 in the 270M); None = SDPA's D^-1/2
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace q/k/v_proj by one qkv_proj ((H + 2K) D, C): one weight read and one kernel call per
        decode step instead of three (as gpt-fast's wqkv). Plain, quantized or LoRA-wrapped parts
        alike (`concat_linears`); parts of different kinds stay separate."""
        if self.qkv_proj is not None:
            return
        fused = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            del self.q_proj, self.k_proj, self.v_proj
            self.qkv_proj = fused

    @staticmethod
    def cache_shape(cfg: ModelConfig) -> tuple[int, int, int]:
        """(heads, key dims, value dims) one cache slot holds per layer: K heads of D-dim keys and values."""
        return cfg.n_kv_head, cfg.head_dim, cfg.head_dim

    @classmethod
    def new_cache(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                  rolling: bool = False, offset: int = 0):
        """The cache this attention reads and writes: K and V (B, K, S, D) per layer, `max_len` slots
        (`BatchKVCache`), or Mistral's W-slot rolling buffer (`RollingKVCache`) with rolling=True."""
        if rolling:
            return RollingKVCache(cfg, batch_size, dtype=dtype, device=device, offset=offset)
        return BatchKVCache(cfg, batch_size, max_len, dtype=dtype, device=device, offset=offset)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> projected q (B, T, H*D), k and v (B, T, K*D), fused projections or not."""
        if self.qkv_proj is not None:
            H, K, D = self.n_head, self.n_kv_head, self.head_dim
            return self.qkv_proj(x).split([H * D, K * D, K * D], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        """x: (B, T, C); rope: (cos, sin) or None; mask: bool (.., T, S) True=attend, or None = causal
        (or every key, for a non-causal attention)."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x)
        q = q.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa = False
        if cache is not None:  # write this step's K/V, attend over the whole cache (B, K, S, D)
            k, v = cache.update(self.layer_idx, input_pos, k, v)
            gqa = K != H  # SDPA shares the K/V heads itself: no (B, H, S, D) copy of the cache per step
        elif K != H:  # share each K/V head among H/K query heads
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        y = sdpa(q, k, v, attn_mask=mask, scale=self.scale, is_causal=self.causal and mask is None and T > 1,
                 enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., D) with rotary pairs (2i, 2i+1) -> pairs (i, i + D/2), the layout `apply_rope` rotates.
    DeepSeek-V3's checkpoints rotate interleaved pairs; permuting q and k alike leaves q·k unchanged."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, sec. 2.1; names as HF DeepseekV3).

    Keys and values are decompressed from one low-rank latent per token, and only the latent is cached:
        c_kv = RMSNorm(W_DKV x)                    (B, T, r)       r = kv_lora_rank
        k_rope = RoPE(W_KR x)                      (B, T, d_r)     one rotary key shared by every head
        [k_nope; v]_h = W_UK,h c_kv ; W_UV,h c_kv  (B, H, T, d_n), (B, H, T, d_v)   (kv_b_proj)
        q_h = [q_nope; RoPE(q_rope)]_h from W_UQ RMSNorm(W_DQ x)  (q_lora_rank; or one q_proj)
        score_h(t, s) = (q_nope,h · k_nope,h + q_rope,h · k_rope) / sqrt(d_n + d_r)
    RoPE is decoupled: rotating k_nope would make W_UK position-dependent and forbid the absorption
    below, so position lives only in the d_r extra dims. A cache slot holds (c_kv, k_rope): r + d_r
    numbers per layer instead of 2·H·D (`cache_shape`).

    Absorbed decode (V2 sec. 2.1.3): q_nope,h · (W_UK,h c) = (W_UK,hᵀ q_nope,h) · c, so the query is
    moved into the latent space and attention runs over the cached latents directly, as MQA with one
    (r + d_r)-dim key head and one r-dim value head; W_UV,h is applied after the weighted sum. Per
    step it costs H·S·r multiply-adds instead of decompressing S latents (S·r·H·(d_n + d_v)), so it
    pays when T < d_n + d_v queries read the cache: decode steps and speculative verification.
    `absorb` forces one path (None: that rule).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = cfg.causal
        self.n_head = cfg.n_head
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        H, C = cfg.n_head, cfg.d_model
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # DeepSeek's fixed eps for the latents
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (self.dn + self.dr), bias=False)
        else:
            self.q_proj = nn.Linear(C, H * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.r + self.dr, bias=cfg.bias)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.r, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.r, H * (self.dn + self.dv), bias=False)  # [W_UK; W_UV] per head
        self.o_proj = nn.Linear(H * self.dv, C, bias=cfg.bias)
        self.absorb: bool | None = None

    @staticmethod
    def cache_shape(cfg: ModelConfig) -> tuple[int, int, int]:
        """One "head" of the latent c_kv (r dims, stored as the cache's k) and the rotary key (d_r, as v)."""
        return 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim

    @classmethod
    def new_cache(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                  rolling: bool = False, offset: int = 0):
        if rolling:
            raise LLMKitError("multi-head latent attention has no sliding window: no rolling-buffer cache")
        return BatchKVCache(cfg, batch_size, max_len, dtype=dtype, device=device, offset=offset,
                            kv_shape=cls.cache_shape(cfg))

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        """x: (B, T, C); rope: (cos, sin) of (T|B,T, d_r); mask as `Attention.forward`."""
        B, T, _ = x.shape
        H, dn, dr, dv, r = self.n_head, self.dn, self.dr, self.dv, self.r
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)  # (B, H, T, d_n|d_r)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # (B, 1, T, r)
        k_rope = k_rope[:, None]  # (B, 1, T, d_r)
        if self.interleave:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope, *rope)
        if cache is not None:  # the cache holds (c_kv, k_rope) per slot: (B, 1, S, r), (B, 1, S, d_r)
            c_kv, k_rope = cache.update(self.layer_idx, input_pos, c_kv, k_rope)
        S = c_kv.size(2)
        scale = (dn + dr) ** -0.5
        causal = self.causal and mask is None and T > 1
        absorb = self.absorb
        if absorb is None:
            absorb = cache is not None and T < dn + dv and isinstance(self.kv_b_proj, nn.Linear)
        if absorb:
            w = self.kv_b_proj.weight.view(H, dn + dv, r)
            w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, d_n, r), (H, d_v, r)
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # W_UKᵀ q_nope: (B, H, T, r)
            y = sdpa(torch.cat([q_lat, q_rope], -1), torch.cat([c_kv, k_rope], -1), c_kv, attn_mask=mask,
                     is_causal=causal, scale=scale, enable_gqa=True)  # (B, H, T, r): weighted latents
            y = torch.einsum("bhtr,hvr->bhtv", y, w_uv)  # W_UV per head: (B, H, T, d_v)
        else:
            kv = self.kv_b_proj(c_kv[:, 0]).view(B, S, H, dn + dv).transpose(1, 2)  # (B, H, S, d_n + d_v)
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)
            y = sdpa(torch.cat([q_nope, q_rope], -1), k, v, attn_mask=mask, is_causal=causal, scale=scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))


ATTENTIONS = {"gqa": Attention, "mla": MLA}


def make_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return attention_class(cfg)(cfg, layer_idx)


def attention_class(cfg: ModelConfig) -> type:
    if cfg.attention not in ATTENTIONS:
        raise LLMKitError(f"unknown attention {cfg.attention!r}{closest(cfg.attention, ATTENTIONS)}; "
                          f"known: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[cfg.attention]


# ---------------------------------------------------------------- MLPs
class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x))  (Shazeer 2020, as in LLaMA)."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.gate_up_proj = None  # set by fuse() (inference only)

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace gate/up_proj by one gate_up_proj (2F, C): one matmul per step instead of two."""
        if self.gate_up_proj is not None:
            return
        fused = concat_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            del self.gate_proj, self.up_proj
            self.gate_up_proj = fused

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(act(up(x)))  (GPT-2: c_fc, gelu_new, c_proj)."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.act = ACTIVATIONS[cfg.activation]
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}


class MoE(nn.Module):
    """Sparse Mixture-of-Experts MLP (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

    A linear router scores E experts per token; the top-k are run and mixed with their softmax
    weights renormalised over the k chosen. The router logits of the last forward are kept in
    `self.router_logits` (N, E) for the load-balancing loss (`llmkit.losses.load_balancing_loss`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_expert_per_tok
        self.gate = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(MLPS[cfg.mlp](cfg) for _ in range(cfg.n_expert))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x):
        B, T, C = x.shape
        xf = x.reshape(-1, C)  # (N, C), N = B*T
        logits = self.gate(xf)  # (N, E)
        self.router_logits = logits
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        return run_experts(self.experts, xf, chosen, weights).view(B, T, C)


def run_experts(experts: nn.ModuleList, xf: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * experts[chosen[n, j]](xf[n]) for xf (N, C), chosen and weights (N, k): each
    expert runs once, on the tokens routed to it."""
    out = torch.zeros_like(xf)
    for e, expert in enumerate(experts):
        tok, slot = (chosen == e).nonzero(as_tuple=True)  # tokens routed to expert e
        if tok.numel():
            out.index_add_(0, tok, expert(xf[tok]) * weights[tok, slot, None])
    return out


class Router(nn.Module):
    """DeepSeekMoE's router (V2 sec. 2.2, V3 sec. 2.1.2): scores s = sigmoid(W x) (V3) or softmax (V2),
    top-k experts chosen by s + b within the topk_group best of n_group expert groups (device-limited
    routing); the gate values are s (not s + b) of the chosen, renormalised (norm_topk_prob) and
    scaled by routed_scaling.

    b (`e_score_correction_bias`, E) is the auxiliary-loss-free balance of V3 (Wang et al. 2024,
    arXiv:2408.15664): with router_balance="bias", each training forward moves b_e by
    rate·sign(mean load - load_e), so overloaded experts get picked less without a loss term pulling on
    the router's weights. It is a buffer (no gradient), saved with the weights as HF does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_expert
        self.top_k, self.n_group, self.topk_group = cfg.n_expert_per_tok, cfg.n_group, cfg.topk_group
        self.scoring, self.norm_topk_prob, self.scaling = cfg.router_scoring, cfg.norm_topk_prob, cfg.routed_scaling
        self.balance_bias, self.rate = cfg.router_balance == "bias", cfg.router_bias_rate
        self.weight = nn.Parameter(torch.empty(E, cfg.d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def forward(self, xf: torch.Tensor):
        """xf (N, C) -> logits (N, E), gate weights (N, k) fp32, chosen experts (N, k)."""
        N, E = xf.size(0), self.weight.size(0)
        logits = F.linear(xf.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:  # keep the experts of the topk_group best groups
            grouped = choice.view(N, self.n_group, E // self.n_group)
            # a group's score: its best expert (V2), the sum of its best two (V3)
            g = grouped.topk(2, -1)[0].sum(-1) if self.scoring == "sigmoid" else grouped.amax(-1)  # (N, G)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(self.topk_group, -1)[1], True)
            choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(N, E), float("-inf"))
        chosen = choice.topk(self.top_k, -1)[1]  # (N, k)
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training and self.balance_bias:
            with torch.no_grad():
                load = torch.bincount(chosen.flatten(), minlength=E).float()  # tokens per expert
                self.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
        return logits, weights * self.scaling, chosen


class DeepSeekMoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066; V2 sec. 2.2): many fine-grained routed experts
    (n_expert SwiGLUs of moe_intermediate_size, k per token) plus n_shared_experts always-on experts
    (one SwiGLU of n·moe_intermediate_size) that hold common knowledge:
        y = shared(x) + sum_{e in topk} g_e · expert_e(x)
    The router's logits of the last forward are kept in `router_logits` (N, E) for the load-balancing
    loss when router_balance="aux_loss"; with "bias" there is no loss (see `Router`)."""

    sparse = True  # make_mlp: this MLP kind routes itself (not the experts of a top-k MoE)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = cfg.moe_intermediate_size or cfg.d_ff
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg, d_ff) for _ in range(cfg.n_expert))
        self.shared_experts = SwiGLU(cfg, d_ff * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.keep_logits = cfg.router_balance == "aux_loss"
        self.router_logits: torch.Tensor | None = None

    def forward(self, x):
        B, T, C = x.shape
        xf = x.reshape(-1, C)  # (N, C)
        logits, weights, chosen = self.gate(xf)
        self.router_logits = logits if self.keep_logits else None
        out = run_experts(self.experts, xf, chosen, weights.to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        return out.view(B, T, C)


MLPS["deepseek_moe"] = DeepSeekMoE


def make_mlp(cfg: ModelConfig, layer_idx: int = 0) -> nn.Module:
    """The MLP of layer `layer_idx`: a sparse kind (DeepSeekMoE) as is; a dense kind as the experts of a
    top-k MoE when n_expert > 0 (Mixtral), else alone. The first `first_k_dense_replace` layers keep a
    dense SwiGLU of d_ff (DeepSeek-V2 sec. 3.1: routing in the lowest layers balances poorly)."""
    if layer_idx < cfg.first_k_dense_replace:
        return SwiGLU(cfg)
    kind = MLPS[cfg.mlp]
    if getattr(kind, "sparse", False) or not cfg.n_expert:
        return kind(cfg)
    return MoE(cfg)


# ---------------------------------------------------------------- dropout
class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014): in training, zero each element with probability p and
    scale the rest by 1/(1-p); identity in eval mode. Same semantics as nn.Dropout.

    Why not nn.Dropout on CPU: torch draws one Bernoulli float per element from a sequential
    generator, ~3.5 ms for a (8, 256, 192) activation at 2 threads, 15-20% of a speedrun training step.
    Here one 64-bit random integer gives four 16-bit lanes, each kept iff lane >= p·2^16 (as signed
    int16), so p is used rounded to a multiple of 2^-16 (0.1 -> 0.099991) and the scale is
    1/(1 - that p): ~0.5 ms for the same mask. Other devices (CUDA's fused kernel is fast) use F.dropout.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        self.p = p
        self.lanes = round(p * 65536)  # dropped lanes of 2^16
        self.scale = 1.0 / (1.0 - self.lanes / 65536)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.lanes - 32768  # P(keep) = 1 - lanes/2^16
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With cfg.sandwich_norm each sublayer's output is normed too before the add (Gemma 2/3):
    x + attn_out_norm(attn(norm(x))). LLaMA's names are kept, so `post_attention_layernorm` is the
    norm in front of the MLP (HF Gemma 3's pre_feedforward_layernorm); the two output norms are
    HF Gemma 3's post_attention_layernorm and post_feedforward_layernorm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = make_attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = make_mlp(cfg, layer_idx)
        self.attn_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.mlp_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()  # off in eval mode
        # the Identity ones are skipped rather than called (a module call costs as much as a small op,
        # and a decode step is mostly such costs)
        self.sandwich, self.drop = cfg.sandwich_norm, cfg.dropout > 0

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, input_pos)
        if self.sandwich:
            h = self.attn_out_norm(h)
        x = x + (self.dropout(h) if self.drop else h)
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            h = self.mlp_out_norm(h)
        return x + (self.dropout(h) if self.drop else h)
