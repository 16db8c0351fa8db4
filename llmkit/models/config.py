"""The one model config: a small dataclass that picks the swappable modules and their sizes.

Families differ only in which modules they use (see `modules.NORMS`, `modules.MLPS`, `modules.ATTENTIONS`):
  gpt2     LayerNorm, GELU MLP, learned absolute positions, biases, tied embeddings
  llama    RMSNorm pre-norm, SwiGLU MLP, rotary positions, grouped-query attention
  mistral  llama + sliding-window attention
  mixtral  mistral + sparse Mixture-of-Experts MLP
  qwen2    llama + biases on q/k/v
  deepseek multi-head latent attention ("mla"), DeepSeekMoE ("deepseek_moe": fine-grained routed plus
           shared experts, sigmoid router with group-limited top-k), optional multi-token prediction
           (DeepSeek-AI 2024, V2 arXiv:2405.04434 and V3 arXiv:2412.19437)
  gemma3   llama + GeGLU (gelu_tanh gate), embeddings x sqrt(C), QK-norm, norms after each sublayer too,
           5 sliding-window layers to 1 global one with their own RoPE bases (Gemma Team 2025)

Norm weights are stored as the multiplier itself (y = x_hat * w): Gemma's (1 + w) parametrisation is
folded in when a checkpoint is read (+1) and unfolded when one is written, as llama.cpp's GGUF does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import LLMKitError, closest


def strict_from_dict(cls, d: dict[str, Any], what: str):
    """cls(**d), an unknown key being a one-line error that suggests close ones (every model config)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise LLMKitError(f"unknown {what} config key {unknown[0]!r}{closest(unknown[0], names)}")
    return cls(**d)


@dataclass
class ModelConfig:
    family: str = "llama"  # gpt2 | llama | mistral | mixtral | qwen2 | deepseek | gemma3 (used for HF export)
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; else GQA
    d_model: int = 768
    head_dim: int | None = None  # None = d_model // n_head
    d_ff: int = 3072
    max_seq_len: int = 2048
    norm: str = "rmsnorm"  # key of modules.NORMS
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # key of modules.MLPS
    activation: str = "silu"  # key of modules.ACTIVATIONS
    pos_emb: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f}, or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1 report, sec. 3)
    rope_scaling: dict | None = None
    attention: str = "gqa"  # key of modules.ATTENTIONS
    causal: bool = True  # False: bidirectional attention, every position sees every other (encoders)
    sliding_window: int | None = None  # position i attends to i-W+1..i (Mistral)
    # n > 0: only layers i with i % n != n-1 use the window, every n-th layer attends globally
    # (Gemma 3: 6, five local to one global); 0: every layer uses sliding_window
    sliding_window_pattern: int = 0
    rope_local_theta: float | None = None  # RoPE base of the windowed layers, unscaled (Gemma 3: 1e4 vs 1e6)
    qk_norm: bool = False  # RMSNorm over each q/k head (D) before RoPE (Gemma 3, Qwen3)
    sandwich_norm: bool = False  # also norm each sublayer's output before the residual add (Gemma 2/3)
    embed_scale: bool = False  # h0 = embedding * sqrt(C) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by 1/sqrt(this), not 1/sqrt(D)
    bias: bool = False  # biases on every linear and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = False  # lm_head shares the token embedding (GPT-2, SmolLM2)
    n_expert: int = 0  # >0 swaps the MLP for a sparse MoE of this many experts (Mixtral)
    n_expert_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    # ---- DeepSeek (family "deepseek"; see modules.MLA, modules.DeepSeekMoE, transformer.MTPModule)
    q_lora_rank: int | None = None  # MLA: rank of the query compression (None: a full-rank q_proj)
    kv_lora_rank: int = 0  # MLA: width of the cached joint K/V latent c_kv
    qk_nope_head_dim: int = 0  # MLA: per-head query/key dims without rotary (decompressed from c_kv)
    qk_rope_head_dim: int = 0  # MLA: per-head rotary dims (one key shared by all heads); = head_dim
    v_head_dim: int = 0  # MLA: per-head value dims
    rope_interleave: bool = False  # rotary pairs (2i, 2i+1) as in DeepSeek-V3, not (i, i + D/2)
    moe_intermediate_size: int = 0  # DeepSeekMoE: width of each routed expert (0: d_ff)
    n_shared_experts: int = 0  # DeepSeekMoE: always-on experts, one SwiGLU of n * moe_intermediate_size
    first_k_dense_replace: int = 0  # the first k layers keep a dense d_ff MLP
    routed_scaling: float = 1.0  # routed experts' weights are multiplied by this
    n_group: int = 1  # experts form n_group groups; tokens pick experts from the topk_group best groups
    topk_group: int = 1
    router_scoring: str = "softmax"  # softmax (V2) | sigmoid (V3)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to 1
    router_balance: str = "aux_loss"  # aux_loss (load-balancing loss) | bias (V3's auxiliary-loss-free)
    router_bias_rate: float = 1e-3  # gamma of the aux-loss-free bias update
    mtp_depth: int = 0  # multi-token prediction modules (V3 sec. 2.2): module k predicts token i+k+1
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss (V3 uses 0.3, later 0.1)
    dropout: float = 0.0  # on embeddings and each residual branch, training only (small-data pretraining)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "n_kv_head", "head_dim",
                     "n_expert", "n_expert_per_tok", "sliding_window"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise LLMKitError(f"model config: {name} must be an integer, got {v!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.attention == "mla":  # rotary tables are built for head_dim: MLA rotates qk_rope_head_dim dims
            if self.head_dim not in (None, self.qk_rope_head_dim) or min(
                    self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim) <= 0:
                raise LLMKitError("attention=mla needs positive kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim "
                                  "and v_head_dim, and head_dim unset or equal to qk_rope_head_dim")
            self.head_dim = self.qk_rope_head_dim
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LLMKitError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise LLMKitError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LLMKitError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_expert and not 0 < self.n_expert_per_tok <= self.n_expert:
            raise LLMKitError(f"n_expert_per_tok={self.n_expert_per_tok} must be in 1..n_expert={self.n_expert}")
        if not 0 <= self.dropout < 1:
            raise LLMKitError(f"dropout={self.dropout} must be in [0, 1)")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise LLMKitError(f"router_scoring={self.router_scoring!r} must be softmax or sigmoid")
        if self.router_balance not in ("aux_loss", "bias"):
            raise LLMKitError(f"router_balance={self.router_balance!r} must be aux_loss or bias")
        if self.n_expert and (self.n_expert % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise LLMKitError(f"n_group={self.n_group} must divide n_expert={self.n_expert}, topk_group="
                              f"{self.topk_group} be in 1..n_group")
        if self.mtp_depth < 0:
            raise LLMKitError(f"mtp_depth={self.mtp_depth} must be >= 0")
        if not self.causal and self.sliding_window:
            raise LLMKitError("a sliding window is a causal pattern: unset sliding_window for a non-causal model")
        if self.sliding_window_pattern < 0 or (self.sliding_window_pattern and not self.sliding_window):
            raise LLMKitError("sliding_window_pattern needs a sliding_window and must be >= 0")

    def local_layer(self, i: int) -> bool:
        """Whether layer i attends within the sliding window (and uses rope_local_theta)."""
        n = self.sliding_window_pattern
        return bool(self.sliding_window) and (n == 0 or i % n != n - 1)

    @property
    def eval_bos(self) -> bool:
        """Whether benchmark requests start with BOS: lm-eval's HFLM prepends it for Gemma ("Gemma
        underperforms without it") and for no other family by default."""
        return self.family.startswith("gemma")

    @property
    def uniform_window(self) -> int | None:
        """The sliding window when every layer has it (what a rolling-buffer cache may rely on), else None."""
        return self.sliding_window if not self.sliding_window_pattern else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return strict_from_dict(cls, d, "model")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise LLMKitError(f"unknown model preset {name!r}{closest(name, PRESETS)}; known: {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)


_GPT2 = dict(family="gpt2", norm="layernorm", mlp="gelu", activation="gelu_tanh", pos_emb="learned",
             bias=True, tie_embeddings=True)
_LLAMA = dict(family="llama", norm="rmsnorm", mlp="swiglu", activation="silu", pos_emb="rope")

_GEMMA3 = dict(family="gemma3", norm="rmsnorm", mlp="swiglu", activation="gelu_tanh", pos_emb="rope",
               rope_theta=1e6, rope_local_theta=1e4, qk_norm=True, sandwich_norm=True, embed_scale=True,
               tie_embeddings=True, norm_eps=1e-6)

PRESETS: dict[str, dict] = {
    # tiny shapes for tests and from-scratch CPU training
    "tiny-gpt2": dict(_GPT2, vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=256, max_seq_len=256),
    "tiny-llama": dict(_LLAMA, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=172,
                       max_seq_len=256),
    "tiny-mistral": dict(_LLAMA, family="mistral", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=64, d_ff=172, max_seq_len=256, sliding_window=16),
    "tiny-mixtral": dict(_LLAMA, family="mixtral", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=64, d_ff=96, max_seq_len=256, sliding_window=None, n_expert=4,
                         n_expert_per_tok=2),
    "tiny-qwen2": dict(_LLAMA, family="qwen2", vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       d_ff=172, max_seq_len=256, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
    "tiny-deepseek": dict(_LLAMA, family="deepseek", vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=128,
                          max_seq_len=256, attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, head_dim=8, v_head_dim=16, rope_interleave=True,
                          mlp="deepseek_moe", n_expert=8, n_expert_per_tok=2, moe_intermediate_size=32,
                          n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                          router_scoring="sigmoid", routed_scaling=2.5, norm_eps=1e-6),
    "tiny-gemma3": dict(_GEMMA3, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, d_model=64, head_dim=32,
                        d_ff=128, max_seq_len=256, sliding_window=8, sliding_window_pattern=3),
    # real shapes
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                         max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True, bos_token_id=1,
                         eos_token_id=2),
    "gemma3-270m": dict(_GEMMA3, vocab_size=262144, n_layer=18, n_head=4, n_kv_head=1, d_model=640,
                        head_dim=256, d_ff=2048, max_seq_len=32768, sliding_window=512, sliding_window_pattern=6,
                        query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1),
    "gpt2-124m": dict(_GPT2, vocab_size=50257, n_layer=12, n_head=12, d_model=768, d_ff=3072, max_seq_len=1024,
                      bos_token_id=50256, eos_token_id=50256),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                         d_ff=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": dict(_LLAMA, family="mistral", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8,
                       d_model=4096, d_ff=14336, max_seq_len=32768, rope_theta=10000.0, sliding_window=4096,
                       bos_token_id=1, eos_token_id=2),
    "mixtral-8x7b": dict(_LLAMA, family="mixtral", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8,
                         d_model=4096, d_ff=14336, max_seq_len=32768, rope_theta=1e6, n_expert=8,
                         n_expert_per_tok=2, bos_token_id=1, eos_token_id=2),
    # DeepSeek-V3 (arXiv:2412.19437; 671B total, 37B active; its one MTP module adds 14B: mtp_depth=1)
    "deepseek-v3": dict(_LLAMA, family="deepseek", vocab_size=129280, n_layer=61, n_head=128, d_model=7168,
                        d_ff=18432, max_seq_len=4096, attention="mla", q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
                        mlp="deepseek_moe", n_expert=256, n_expert_per_tok=8, moe_intermediate_size=2048,
                        n_shared_experts=1, first_k_dense_replace=3, n_group=8, topk_group=4,
                        router_scoring="sigmoid", routed_scaling=2.5, router_balance="bias", norm_eps=1e-6,
                        bos_token_id=0, eos_token_id=1),
    "qwen2.5-0.5b": dict(_LLAMA, family="qwen2", vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2,
                         d_model=896, d_ff=4864, max_seq_len=32768, rope_theta=1e6, qkv_bias=True,
                         tie_embeddings=True, norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645),
}
