"""Parameter counts and FLOPs per token, from the config alone (no weights allocated)."""

from __future__ import annotations

from .config import ModelConfig


def _layer_params(cfg: ModelConfig, active: bool) -> int:
    C, D = cfg.d_model, cfg.head_dim
    qkv_b = cfg.bias or cfg.qkv_bias
    attn = C * cfg.n_head * D + 2 * C * cfg.n_kv_head * D + cfg.n_head * D * C
    if qkv_b:
        attn += cfg.n_head * D + 2 * cfg.n_kv_head * D
    if cfg.bias:
        attn += C
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    expert = n_mats * C * cfg.d_ff
    if cfg.bias:
        expert += (n_mats - 1) * cfg.d_ff + C
    if cfg.n_expert:
        k = cfg.n_expert_per_tok if active else cfg.n_expert
        mlp = k * expert + C * cfg.n_expert
    else:
        mlp = expert
    norms = (4 if cfg.sandwich_norm else 2) * C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    if cfg.qk_norm:
        norms += 2 * D
    return attn + mlp + norms


def num_params(cfg: ModelConfig, active: bool = False, embeddings: bool = True) -> int:
    """Total parameters (active=True: only the experts a token uses, for MoE models)."""
    C = cfg.d_model
    n = cfg.n_layer * _layer_params(cfg, active)
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
