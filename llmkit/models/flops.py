"""Parameter counts, FLOPs and KV-cache bytes per token, from the config alone (no weights allocated)."""

from __future__ import annotations

from .config import ModelConfig
from .modules import attention_class


def _mla_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention: q (low-rank with its norm, or full), [W_DKV; W_KR], the latent's
    norm, [W_UK; W_UV] and the output projection."""
    C, H, r = cfg.d_model, cfg.n_head, cfg.kv_lora_rank
    dq = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = C * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * dq if cfg.q_lora_rank else C * H * dq
    kv = C * (r + cfg.qk_rope_head_dim) + r + r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * C


def _layer_params(cfg: ModelConfig, active: bool, layer_idx: int = 0) -> int:
    C, D = cfg.d_model, cfg.head_dim
    qkv_b = cfg.bias or cfg.qkv_bias
    attn = C * cfg.n_head * D + 2 * C * cfg.n_kv_head * D + cfg.n_head * D * C
    if cfg.attention == "mla":
        attn = _mla_params(cfg)
    elif qkv_b:
        attn += cfg.n_head * D + 2 * cfg.n_kv_head * D
    if cfg.bias:
        attn += C
    n_mats = 3 if cfg.mlp in ("swiglu", "deepseek_moe") else 2
    expert = n_mats * C * cfg.d_ff
    if cfg.bias:
        expert += (n_mats - 1) * cfg.d_ff + C
    k = cfg.n_expert_per_tok if active else cfg.n_expert
    if layer_idx < cfg.first_k_dense_replace or not cfg.n_expert:
        mlp = expert
    elif cfg.mlp == "deepseek_moe":  # fine-grained routed experts + shared experts + router
        mlp = (k + cfg.n_shared_experts) * 3 * C * (cfg.moe_intermediate_size or cfg.d_ff) + C * cfg.n_expert
    else:
        mlp = k * expert + C * cfg.n_expert
    norms = (4 if cfg.sandwich_norm else 2) * C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    if cfg.qk_norm:
        norms += 2 * D
    return attn + mlp + norms


def num_params(cfg: ModelConfig, active: bool = False, embeddings: bool = True) -> int:
    """Total parameters (active=True: only the experts a token uses, for MoE models), multi-token
    prediction modules included (each a layer plus its two input norms, eh_proj and final norm)."""
    C = cfg.d_model
    n = sum(_layer_params(cfg, active, i) for i in range(cfg.n_layer))
    n += cfg.mtp_depth * (_layer_params(cfg, active, cfg.n_layer) + 3 * C + 2 * C * C)
    n += C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)  # final norm
    if embeddings:
        n += cfg.vocab_size * C
        if not cfg.tie_embeddings:
            n += cfg.vocab_size * C
        if cfg.pos_emb == "learned":
            n += cfg.max_seq_len * C
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs per token (Kaplan et al. 2020; PaLM appendix B): 2N forward (6N with backward),
    N the active non-embedding parameters plus the output head, plus attention's 2·L·T·H·D per
    score and value product (×3 with backward)."""
    T = seq_len or cfg.max_seq_len
    n = num_params(cfg, active=True, embeddings=False) + cfg.vocab_size * cfg.d_model
    attn = 2 * 2 * cfg.n_layer * T * cfg.n_head * cfg.head_dim  # QK^T and AV, per token, forward
    fwd = 2 * n + attn
    return 3 * fwd if training else fwd


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Bytes of KV cache one token takes over all layers (bf16 by default): the attention's cache slot
    (`cache_shape`: heads x (key + value dims)) times the layers, MTP blocks included.
      MHA / GQA: 2·K·D per layer (K = n_kv_head; MHA K = H)
      MLA:       r + d_r per layer (latent c_kv and the shared rotary key; DeepSeek-V2 table 1)"""
    heads, dk, dv = attention_class(cfg).cache_shape(cfg)
    return (cfg.n_layer + cfg.mtp_depth) * heads * (dk + dv) * bytes_per_element
