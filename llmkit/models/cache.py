"""Pre-allocated key/value caches for incremental decoding (prefill, then one token at a time).

Only the K/V heads are stored, so grouped-query models keep n_kv_head/n_head of the memory.
The model asks a cache two things: which slots each query may attend to (`mask(input_pos)`, once per
forward before the layers) and where to write this step's K/V (`update(layer, input_pos, k, v)`, once
per layer, returning the keys/values to attend over), so other layouts only replace the class.
Build caches with `Transformer.new_cache`: the model sizes them and fills the slots of its prefix
(e.g. a prompt-tuning soft prompt), `offset` slots in front of the callers' positions.

- `KVCache`: slot j holds position j, positions shared by the rows.
- `BatchKVCache`: slot j of row b holds position j of that row. Positions may differ per row
  (input_pos of shape (B, T)), so prompts of different lengths decode together: right-padded
  prompts need no padding mask, because a query at position i only sees slots j <= i and the pad
  slots past a row's end are overwritten by its own next tokens before any query reaches them.
  The same rule makes rollback free (speculative decoding, prefix reuse): stale slots past the
  current position are never attended. Attention only reads slots 0..max position, not max_len.
- The tensors a slot holds are the attention's choice (`kv_shape`): K and V heads (B, K, S, D) by
  default; multi-head latent attention stores its latent c_kv and shared rotary key (B, 1, S, r) and
  (B, 1, S, d_rope) instead, with the same slot and row logic.
- `RollingKVCache`: Mistral's rolling buffer (Jiang et al. 2023, sec. 2) for sliding-window
  models: W slots, position p lives in slot p mod W, so memory is W entries, not T.
"""

from __future__ import annotations

import torch

from ..errors import LLMKitError
from .config import ModelConfig


class KVCache:
    """k[l], v[l]: (B, K, S, D) for layer l; slot j holds position j.

    kv_shape: (heads, k_dim, v_dim) per slot, default (n_kv_head, head_dim, head_dim); an attention that
    caches something else passes its own (MLA: (1, kv_lora_rank, qk_rope_head_dim))."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 offset: int = 0, kv_shape: tuple[int, int, int] | None = None):
        heads, dk, dv = kv_shape or (cfg.n_kv_head, cfg.head_dim, cfg.head_dim)
        self.offset = offset  # leading slots held by the model's prefix (set by Transformer.new_cache)
        L = cfg.n_layer + cfg.mtp_depth  # multi-token prediction blocks keep their K/V after the layers'
        self.k = torch.zeros((L, batch_size, heads, max_len, dk), dtype=dtype, device=device)
        self.v = torch.zeros((L, batch_size, heads, max_len, dv), dtype=dtype, device=device)
        self.max_len = max_len
        self.window = cfg.uniform_window  # a window every layer has; per-layer ones come with mask()

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) at positions input_pos (T,); return the layer's full (B, K, S, D)."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, input_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """(1, 1, T, S) bool: query at position i sees slot j iff j <= i (and i - j < W with a window:
        `window`, for the layers that have one, else the cache's own)."""
        W = window or self.window
        j = torch.arange(self.max_len, device=input_pos.device)
        i = input_pos[:, None]
        m = j[None, :] <= i
        if W:
            m = m & (i - j[None, :] < W)
        return m[None, None]


class BatchKVCache(KVCache):
    """k[l], v[l]: (B, K, S, D); per-row positions; attention reads only slots < `self.length`."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 offset: int = 0, kv_shape: tuple[int, int, int] | None = None):
        if max_len > cfg.max_seq_len:
            raise LLMKitError(f"cache of {max_len} tokens is longer than the model's context window "
                              f"of {cfg.max_seq_len}")
        super().__init__(cfg, batch_size, max_len, dtype=dtype, device=device, offset=offset, kv_shape=kv_shape)
        self.length = 0  # slots 0..length-1 are read by this forward

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def mask(self, input_pos: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
        """input_pos (T,) shared or (B, T) per row -> bool (1|B, 1, T, length), or None when every
        slot read is visible (a single decode step with no window), which lets SDPA skip masking.
        window: that of the layers asking (interleaved local/global models ask once per kind)."""
        W = window or self.window
        hi = int(input_pos.max()) + 1
        if hi > self.max_len:
            raise LLMKitError(f"position {hi - 1} is past the cache's {self.max_len} slots")
        self.length = hi
        if input_pos.dim() == 1 and not W and (input_pos.numel() == 1 or int(input_pos[0]) == 0):
            return None  # one decode step sees every slot read; a prefill from 0 is plain causal (T == length)
        j = torch.arange(hi, device=input_pos.device)
        i = input_pos[..., None]  # (T, 1) or (B, T, 1)
        m = j <= i
        if W:
            m = m & (i - j < W)
        return m[None, None] if input_pos.dim() == 1 else m[:, None]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) at input_pos; return this layer's (B, K, length, D) views."""
        # eager writes go into this layer's (B, K, S, D) view: index_copy_ there costs 4-6 us a call, the
        # whole-tensor index_put_ that the compiled step needs (StaticKVCache.update) 11-14 us
        ck, cv = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:  # (index_copy_ takes no other dtype: cast only where they differ)
            ck.index_copy_(2, input_pos, k if k.dtype == ck.dtype else k.to(ck.dtype))
            cv.index_copy_(2, input_pos, v if v.dtype == cv.dtype else v.to(cv.dtype))
        else:  # per-row slots: row b's T tokens go to slots input_pos[b]
            rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1) against input_pos (B, T)
            ck[rows, :, input_pos] = k.transpose(1, 2).to(ck.dtype)  # indexed (B, T, K, D)
            cv[rows, :, input_pos] = v.transpose(1, 2).to(cv.dtype)
        return ck[:, :, : self.length], cv[:, :, : self.length]

    def static(self, length: int | None = None) -> "StaticKVCache":
        """The first `length` slots (default: all; shared storage, no copy) read whole, for the compiled
        decode step. One view per length, made once and reused (a decode loop asks every step); the
        slot count is marked dynamic, so one compiled graph serves every length."""
        length = self.max_len if length is None else min(length, self.max_len)
        k, v, views = self.__dict__.get("_static") or (None, None, None)
        if k is not self.k or v is not self.v:  # none made yet, or the storage was replaced
            views = {}
            self._static = (self.k, self.v, views)  # {length: view} over these tensors
        if length not in views:
            out = StaticKVCache.__new__(StaticKVCache)
            out.__dict__.update(self.__dict__)
            del out.__dict__["_static"]
            out.k, out.v = self.k[:, :, :, :length], self.v[:, :, :, :length]
            out.max_len = length
            for t in (out.k, out.v):
                torch._dynamo.maybe_mark_dynamic(t, 3)
            views[length] = out
        return views[length]

    # ---------------------------------------------------------------- row / prefix management
    def select_rows(self, rows: torch.Tensor) -> "BatchKVCache":
        """A cache of the given rows (B',), e.g. n copies of a prompt's row for n samples."""
        out = BatchKVCache.__new__(BatchKVCache)
        out.__dict__.update(self.__dict__)
        out.k, out.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        return out

    def rows(self, lo: int, hi: int) -> "BatchKVCache":
        """A cache over rows lo..hi-1 sharing this one's storage (a view, no copy): a server keeps one
        pre-allocated pool of rows and runs each forward on the rows it needs."""
        out = BatchKVCache.__new__(BatchKVCache)
        out.__dict__.update(self.__dict__)
        out.k, out.v = self.k[:, lo:hi], self.v[:, lo:hi]
        out.length = 0
        return out

    def move_row(self, src: int, dst: int, n: int):
        """Copy the first n slots (prefix slots included) of row src into row dst."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def read(self, n: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the K/V of the caller's positions 0..n-1 of one row (after the prefix slots):
        (L, K, n, D) each."""
        o = self.offset
        return self.k[:, row, :, o:o + n].clone(), self.v[:, row, :, o:o + n].clone()

    def write(self, k: torch.Tensor, v: torch.Tensor, row: int | None = None):
        """Put (L, K, n, D) K/V into the caller's positions 0..n-1 of one row (or every row)."""
        o, n = self.offset, k.size(2)
        rows = slice(None) if row is None else slice(row, row + 1)
        self.k[:, rows, :, o:o + n] = k[:, None].to(self.k.dtype)
        self.v[:, rows, :, o:o + n] = v[:, None].to(self.v.dtype)


class StaticKVCache(BatchKVCache):
    """A `BatchKVCache` whose forwards read all `max_len` slots behind a mask, so nothing depends on a
    position's value: no tensor is read into a Python int and every step has the same shapes. That is
    what lets `torch.compile` trace one decode graph for every position (gpt-fast's static cache); a
    BatchKVCache reads only slots < max position + 1, a length that changes each step and would
    recompile the graph each step. Positions are not range-checked here (that would read them): the
    caller (inference.generate.decode_step) checks them before the graph runs."""

    static = True  # Transformer.forward then skips its own position read (the context-length check)

    def mask(self, input_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """input_pos (T,) or (B, T) -> bool (1|B, 1, T, max_len): slot j is seen iff j <= i (and i - j < W)."""
        W = window or self.window
        j = torch.arange(self.k.size(3), device=input_pos.device)  # the tensor's size, not the int max_len:
        i = input_pos[..., None]  # a compiled graph then follows a new cache length as a dynamic size
        m = j <= i
        if W:
            m = m & (i - j < W)
        return m[None, None] if input_pos.dim() == 1 else m[:, None]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) at input_pos; return this layer's whole (B, K, max_len, D)."""
        # one index_put_ into the whole (L, B, K, S, D) tensor, the layer given as a tensor index: the
        # compiled graph then mutates its cache input in place. Writing into a view of it (k[layer])
        # made AOTAutograd's functionalisation rebuild the whole tensor per layer per step, and one
        # input per layer (views) cost a dynamic size and a guarded tensor per layer
        B, T = k.size(0), k.size(2)
        pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos  # (B, T)
        rows = torch.arange(B, device=k.device)[:, None]
        at = torch.full((1, 1), layer, dtype=torch.long, device=k.device)
        self.k[at, rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed (B, T, K, D)
        self.v[at, rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer], self.v[layer]


class RollingKVCache:
    """Rolling buffer of W = sliding_window slots: position p is stored in slot p mod W.

    All rows share positions (input_pos (T,)). A forward attends over [buffer, this chunk's K/V]
    so chunks longer than W still see their own keys; the buffer then keeps the last W.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, dtype=torch.float32, device=None, offset: int = 0):
        if not cfg.uniform_window:
            raise LLMKitError("a rolling-buffer cache needs a model whose every layer has a sliding window "
                              "(sliding_window is unset, or some layers attend globally)")
        self.window = W = cfg.sliding_window
        self.n_layer = cfg.n_layer
        shape = (cfg.n_layer + cfg.mtp_depth, batch_size, cfg.n_kv_head, W, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((W,), -1, dtype=torch.long, device=device)  # position held, -1 empty
        self.max_len = None  # unbounded: the model's context window is the only limit
        self.offset = offset  # leading positions held by the model's prefix (set by Transformer.new_cache)

    def mask(self, input_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """(1, 1, T, W + T) over [buffer slots, new keys] (every layer has the cache's window W). Buffer
        slots holding positions >= the chunk's first position are stale (rolled back) and hidden."""
        if input_pos.dim() != 1:
            raise LLMKitError("the rolling-buffer cache takes one shared position vector (T,), not per-row positions")
        old = self.slot_pos
        old = torch.where(old < input_pos[0], old, torch.full_like(old, -1))
        kpos = torch.cat([old, input_pos])  # (W + T,)
        i = input_pos[:, None]
        m = (kpos >= 0) & (kpos <= i) & (i - kpos < self.window)
        return m[None, None]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Return [buffer, k] (B, K, W + T, D) for attention, then keep the last W of the chunk."""
        kk = torch.cat([self.k[layer], k.to(self.k.dtype)], dim=2)
        vv = torch.cat([self.v[layer], v.to(self.v.dtype)], dim=2)
        keep = input_pos[-self.window:]
        slots = keep % self.window
        self.k[layer].index_copy_(2, slots, k[:, :, -self.window:].to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v[:, :, -self.window:].to(self.v.dtype))
        if layer == self.n_layer - 1:  # the last layer: the buffer now holds these positions
            self.slot_pos.index_copy_(0, slots, keep)
        return kk, vv

    def select_rows(self, rows: torch.Tensor) -> "RollingKVCache":
        out = RollingKVCache.__new__(RollingKVCache)
        out.__dict__.update(self.__dict__)
        out.k, out.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        out.slot_pos = self.slot_pos.clone()
        return out
