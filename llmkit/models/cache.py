"""Pre-allocated key/value cache for incremental decoding (prefill, then one token at a time).

Only the K/V heads are stored, so grouped-query models keep n_kv_head/n_head of the memory.
The model asks the cache two things: where to write this step's K/V (`update`) and which
slots each query may attend to (`mask`), so other layouts (a rolling buffer for sliding-window
models, per-row positions for batches) only replace this class.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """k[l], v[l]: (B, K, S, D) for layer l; slot j holds position j."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.window = cfg.sliding_window

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) at positions input_pos (T,); return the layer's full (B, K, S, D)."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(1, 1, T, S) bool: query at position i sees slot j iff j <= i (and i - j < W with a window)."""
        j = torch.arange(self.max_len, device=input_pos.device)
        i = input_pos[:, None]
        m = j[None, :] <= i
        if self.window:
            m = m & (i - j[None, :] < self.window)
        return m[None, None]
