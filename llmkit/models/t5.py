"""T5: the encoder-decoder transformer of Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer" (T5 v1.0), and its v1.1 / Flan-T5 variant (gated GELU, untied
output layer; Chung et al. 2022).

Where it differs from the decoder (transformer.py):
  - two stacks sharing one token embedding: a bidirectional encoder over the input, and a causal
    decoder whose blocks add cross-attention over the encoder's output (Vaswani et al. 2017);
  - positions are a learned scalar bias per head and *relative-position bucket* (sec. 2.1 of the
    paper): exact buckets for small distances, log-spaced ones up to `rel_max_distance`. Each stack
    computes it once, from its own (buckets, H) table, and every layer adds the same bias;
  - no 1/sqrt(D) on q·k: T5 folds it into the initialisation of q (std (C·D)^-1/2);
  - pre-norm T5LayerNorm = RMSNorm without mean subtraction or bias (modules.RMSNorm);
  - the MLP is the shared registry's: "relu" = DenseReluDense (GeluMLP with ReLU), "gated-gelu" =
    v1.1's gated GELU (SwiGLU's gate·up layout with tanh-GELU); HF names wi/wo, wi_0/wi_1/wo;
  - v1.0 ties the output layer to the embedding and scales the decoder output by d_model^-1/2 first;
    v1.1 unties it and does not scale.

Generation: `decoder_for(prompts)` runs the encoder once and returns `EncodedPrompts`, a decoder-only
view of the model (new_cache / forward / lm_head, as `Transformer`) that starts from the decoder start
token, so the engine's one decode loop (llmkit.inference.generate) drives it unchanged. Its cache
(`T5Cache`) holds a pre-allocated self-attention `BatchKVCache` and each layer's cross-attention K/V,
projected once from the encoder output.

`load_hf_t5(dir)` reads a Hugging Face T5ForConditionalGeneration folder (config.json + safetensors);
logits and greedy output equal transformers' (tests/test_models_t5.py).

Shapes: B batch, T decoder tokens, S encoder tokens, C d_model, H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError, closest
from .cache import BatchKVCache
from .config import ModelConfig, strict_from_dict
from .modules import MLPS, Dropout, RMSNorm

# Hugging Face activation names -> keys of modules.ACTIVATIONS ("gated-gelu" means tanh GELU, HF's gelu_new)
_HF_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


@dataclass
class T5Config:
    family: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # head dim; H·D need not equal C
    d_ff: int = 2048
    n_layer: int = 6  # encoder blocks
    n_decoder_layer: int | None = None  # None = n_layer
    n_head: int = 8
    rel_buckets: int = 32
    rel_max_distance: int = 128
    norm_eps: float = 1e-6
    mlp: str = "relu"  # HF feed_forward_proj: "ACT" (T5 v1.0: relu) or "gated-ACT" (v1.1 / Flan: gated-gelu)
    tie_embeddings: bool = True  # lm_head shares the token embedding (v1.0)
    rescale_output: bool = True  # decoder output · d_model^-1/2 before lm_head (v1.0, with the tied head)
    max_seq_len: int = 512  # longest encoder input and decoder output accepted (relative positions have no table)
    dropout: float = 0.0  # T5 pretrained with 0.1 on embeddings, residual branches and attention outputs
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad id

    def __post_init__(self):
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "n_layer", "n_decoder_layer", "n_head", "rel_buckets",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LLMKitError(f"t5 config: {name} must be positive, got {getattr(self, name)}")
        self.mlp_spec()  # fails early on an unknown activation
        if not 0 <= self.dropout < 1:
            raise LLMKitError(f"dropout={self.dropout} must be in [0, 1)")

    def mlp_spec(self) -> tuple[str, str]:
        """(key of modules.MLPS, key of modules.ACTIVATIONS) for `mlp`."""
        gated, _, act = self.mlp.rpartition("-")
        if gated not in ("", "gated") or act not in _HF_ACTS:
            raise LLMKitError(f"unsupported t5 mlp {self.mlp!r} (supported: relu, gelu, gated-gelu, gated-silu, ...: "
                              f"[gated-]{{{', '.join(_HF_ACTS)}}})")
        act = "gelu_tanh" if self.mlp == "gated-gelu" else _HF_ACTS[act]  # HF: "gated-gelu" means gelu_new
        return ("swiglu" if gated else "gelu"), act

    def module_config(self) -> ModelConfig:
        """The shared modules' view (MLP registry, decoder KV cache): no biases, RMS norms, the decoder's
        depth, H heads of D dims."""
        mlp, act = self.mlp_spec()
        return ModelConfig(family="t5", vocab_size=self.vocab_size, n_layer=self.n_decoder_layer, n_head=self.n_head,
                           d_model=self.d_model, head_dim=self.d_kv, d_ff=self.d_ff, max_seq_len=self.max_seq_len,
                           norm="rmsnorm", norm_eps=self.norm_eps, mlp=mlp, activation=act, pos_emb="relative",
                           bias=False, eos_token_id=self.eos_token_id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return strict_from_dict(cls, d, "t5")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "T5Config":
        if name not in T5_PRESETS:
            raise LLMKitError(f"unknown t5 preset {name!r}{closest(name, T5_PRESETS)}; known: {', '.join(T5_PRESETS)}")
        return cls.from_dict({**T5_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "T5Config":
        """From a Hugging Face T5 config.json. transformers >= 5 writes `scale_decoder_outputs`; older
        files say it through tie_word_embeddings (false in v1.1), which the weights settle (load_hf_t5)."""
        try:
            tie = hf.get("tie_word_embeddings", True) is not False
            return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
                       n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers"), n_head=hf["num_heads"],
                       rel_buckets=hf.get("relative_attention_num_buckets", 32),
                       rel_max_distance=hf.get("relative_attention_max_distance", 128),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-6), mlp=hf.get("feed_forward_proj", "relu"),
                       tie_embeddings=tie, rescale_output=hf.get("scale_decoder_outputs", tie),
                       max_seq_len=hf.get("n_positions") or 512, pad_token_id=_int(hf.get("pad_token_id"), 0),
                       eos_token_id=_int(hf.get("eos_token_id"), 1),
                       decoder_start_token_id=_int(hf.get("decoder_start_token_id"), 0))
        except KeyError as e:
            raise LLMKitError(f"{where} is missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=self.vocab_size,
                    d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff, num_layers=self.n_layer,
                    num_decoder_layers=self.n_decoder_layer, num_heads=self.n_head,
                    relative_attention_num_buckets=self.rel_buckets,
                    relative_attention_max_distance=self.rel_max_distance, layer_norm_epsilon=self.norm_eps,
                    feed_forward_proj=self.mlp, tie_word_embeddings=self.tie_embeddings,
                    scale_decoder_outputs=self.rescale_output, n_positions=self.max_seq_len,
                    dropout_rate=self.dropout, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                    decoder_start_token_id=self.decoder_start_token_id, is_encoder_decoder=True,
                    torch_dtype="float32")


def _int(x, default: int) -> int:
    x = x[0] if isinstance(x, list) and x else x
    return default if x is None else int(x)


_V10 = dict(mlp="relu", tie_embeddings=True, rescale_output=True)
_V11 = dict(mlp="gated-gelu", tie_embeddings=False, rescale_output=False)

T5_PRESETS: dict[str, dict] = {
    # tests and CPU pretraining: 2 + 2 blocks, C = 64 (4 heads of 16)
    "tiny-t5": dict(_V10, vocab_size=256, d_model=64, d_kv=16, d_ff=128, n_layer=2, n_head=4, max_seq_len=256),
    "tiny-t5-v1.1": dict(_V11, vocab_size=256, d_model=64, d_kv=16, d_ff=96, n_layer=2, n_head=4, max_seq_len=256),
    # real shapes: t5-small (60M) and flan-t5-small (77M)
    "t5-small": dict(_V10, vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, n_layer=6, n_head=8),
    "flan-t5-small": dict(_V11, vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, n_layer=8, n_head=6),
}


# ---------------------------------------------------------------- relative position bias
def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket of each relative position rel = key position - query position (Raffel et al. 2020,
    sec. 2.1; Mesh TensorFlow's `_relative_position_bucket`). Bidirectional: half the buckets for keys
    after the query. Of the rest, half are exact distances 0..n/2-1, the others log-spaced up to
    max_distance (farther keys share the last bucket). Causal: only keys at or before the query count."""
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp_min(0)
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    log_bucket = log_bucket.clamp_max(num_buckets - 1)
    return bucket + torch.where(dist < exact, dist, log_bucket)


# ---------------------------------------------------------------- blocks
class T5Attention(nn.Module):
    """Multi-head attention softmax(q·kᵀ + bias)·v with no 1/sqrt(D) scaling; bias (B|1, H|1, T, S)
    holds the relative-position bias and the mask (a large negative number at hidden keys)."""

    def __init__(self, cfg: T5Config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, cfg.n_head, cfg.d_kv
        inner = cfg.n_head * cfg.d_kv
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H·D) -> (B, H, T, D)
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def memory(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K, V (B, H, S, D) of the encoder output mem (B, S, C): once per generation."""
        return self._heads(self.k_proj(mem)), self._heads(self.v_proj(mem))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: tuple | None = None, cache=None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); kv: the encoder's (K, V) for cross-attention, else self-attention on x (written
        into `cache` at input_pos when decoding) -> (B, T, C)."""
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))
        if kv is None:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                k, v = cache.update(self.layer_idx, input_pos, k, v)
        else:
            k, v = kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class T5Block(nn.Module):
    """Pre-norm block: x + SelfAttn(norm(x)) [+ CrossAttn(norm(x), encoder)] + MLP(norm(x))."""

    def __init__(self, cfg: T5Config, layer_idx: int, cross: bool):
        super().__init__()
        mcfg = cfg.module_config()
        self.self_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = T5Attention(cfg, layer_idx)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cross else None
        self.cross_attn = T5Attention(cfg, layer_idx) if cross else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLPS[mcfg.mlp](mcfg)  # the decoder's registered MLP: GeluMLP (wi, wo) or SwiGLU (wi_0, wi_1, wo)
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, bias, cache=None, input_pos=None, cross_kv=None, cross_bias=None):
        x = x + self.dropout(self.self_attn(self.self_norm(x), bias, cache=cache, input_pos=input_pos))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, kv=cross_kv))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) blocks, their shared
    relative-position bias table (HF: block.0's relative_attention_bias) and the final norm."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        n = cfg.n_decoder_layer if decoder else cfg.n_layer
        self.layers = nn.ModuleList(T5Block(cfg, i, cross=decoder) for i in range(n))
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def position_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(1, H, T, S) learned bias of each head for query positions q_pos (T,), key positions k_pos (S,)."""
        b = relative_position_bucket(k_pos[None, :] - q_pos[:, None], bidirectional=not self.decoder,
                                     num_buckets=self.cfg.rel_buckets, max_distance=self.cfg.rel_max_distance)
        return self.rel_bias(b).permute(2, 0, 1)[None]

    def forward(self, x, bias, cache=None, input_pos=None, cross_kv=None, cross_bias=None):
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, cache, input_pos, None if cross_kv is None else cross_kv[i], cross_bias)
        return self.dropout(self.norm(x))


def _hide(bias: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """bias with the positions where `visible` is False pushed to the dtype's minimum (softmax weight 0;
    not -inf, so a fully hidden row gives uniform weights, not NaN)."""
    return bias.masked_fill(~visible, torch.finfo(bias.dtype).min)


class T5Cache:
    """Decoder state for generation: a pre-allocated self-attention `BatchKVCache` (B, H, slots, D) per
    layer, each layer's cross-attention (K, V) (B, H, S, D) projected once from the encoder output, and
    the encoder padding bias (B, 1, 1, S)."""

    offset = 0  # no prefix slots

    def __init__(self, self_kv: BatchKVCache, cross: list[tuple[torch.Tensor, torch.Tensor]], cross_bias: torch.Tensor):
        self.self_kv, self.cross, self.cross_bias = self_kv, cross, cross_bias

    def select_rows(self, rows: torch.Tensor) -> "T5Cache":
        """A cache of the given rows (B',): n samples of a prompt share its encoder output."""
        return T5Cache(self.self_kv.select_rows(rows), [(k[rows], v[rows]) for k, v in self.cross],
                       self.cross_bias[rows])


# ---------------------------------------------------------------- the model
class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)  # HF "shared": both stacks' input embedding
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    def init_weights(self):
        """T5's initialisation (Mesh TF, as in HF's T5PreTrainedModel): N(0, 1) embeddings, every matrix
        N(0, fan_in^-1/2), except q at (C·D)^-1/2, which stands in for the 1/sqrt(D) the attention omits."""
        C, D = self.cfg.d_model, self.cfg.d_kv
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if "norm" in name:
                nn.init.ones_(p)
            elif name in ("embed_tokens.weight", "lm_head.weight"):
                nn.init.normal_(p, 0.0, 1.0)
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, 0.0, (C * D) ** -0.5)
            elif name.endswith("rel_bias.weight"):
                nn.init.normal_(p, 0.0, C ** -0.5)
            else:  # (out, in): std in^-1/2
                nn.init.normal_(p, 0.0, p.size(1) ** -0.5)

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_seq_len

    def _check_len(self, n: int, what: str):
        if n > self.cfg.max_seq_len:
            raise LLMKitError(f"{what} of {n} tokens is longer than the model's max_seq_len of {self.cfg.max_seq_len}")

    # ------------------------------------------------------------ encoder
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, S), mask (B, S) 1 at real tokens (default all) -> (encoder output (B, S, C), the
        cross-attention padding bias (B, 1, 1, S): 0 at real tokens, a large negative number at padding)."""
        B, S = ids.shape
        self._check_len(S, "encoder input")
        keep = torch.ones(B, S, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
        pos = torch.arange(S, device=ids.device)
        bias = _hide(self.encoder.position_bias(pos, pos), keep[:, None, None, :])  # (B, H, S, S)
        x = self.encoder(self.embed_tokens(ids), bias)
        zero = torch.zeros(B, 1, 1, S, dtype=x.dtype, device=x.device)
        return x, _hide(zero, keep[:, None, None, :])

    # ------------------------------------------------------------ decoder
    def decode(self, ids: torch.Tensor, memory: torch.Tensor | None = None, memory_bias: torch.Tensor | None = None,
               input_pos: torch.Tensor | None = None, cache: T5Cache | None = None, last_only: bool = False,
               return_hidden: bool = False) -> torch.Tensor:
        """Decoder ids (B, T) -> logits (B, T, V) (or the scaled hidden states (B, T, C) that lm_head takes).
        Without a cache: positions 0..T-1, causal, over `memory` (B, S, C) with its bias from `encode`.
        With one: at input_pos (T,) shared by the rows, the encoder's K/V and bias read from the cache."""
        T = ids.size(1)
        dev = ids.device
        if cache is None:
            pos = torch.arange(T, device=dev)
            self._check_len(T, "decoder input")
            bias = _hide(self.decoder.position_bias(pos, pos), pos[None, :] <= pos[:, None])  # (1, H, T, T)
            cross_kv = [layer.cross_attn.memory(memory) for layer in self.decoder.layers]
            x = self.decoder(self.embed_tokens(ids), bias, cross_kv=cross_kv, cross_bias=memory_bias)
        else:
            if input_pos is None or input_pos.dim() != 1:
                raise LLMKitError("decoding with a T5 cache takes one position vector (T,) shared by the rows")
            self._check_len(int(input_pos.max()) + 1, "decoder output")
            mask = cache.self_kv.mask(input_pos)  # (1, 1, T, L) or None: every slot read is visible
            keys = torch.arange(cache.self_kv.length, device=dev)
            bias = self.decoder.position_bias(input_pos, keys)
            if mask is not None:
                bias = _hide(bias, mask)
            x = self.decoder(self.embed_tokens(ids), bias, cache=cache.self_kv, input_pos=input_pos,
                             cross_kv=cache.cross, cross_bias=cache.cross_bias)
        if last_only:
            x = x[:, -1:]
        if self.cfg.rescale_output:  # v1.0: the tied head sees h · C^-1/2 (Mesh TF)
            x = x * self.cfg.d_model ** -0.5
        return x if return_hidden else self.lm_head(x)

    def forward(self, idx: torch.Tensor, decoder_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: encoder ids (B, S) [mask (B, S)], decoder ids (B, T) -> logits (B, T, V)."""
        memory, memory_bias = self.encode(idx, mask)
        return self.decode(decoder_ids, memory, memory_bias)

    def new_cache(self, memory: torch.Tensor, memory_bias: torch.Tensor, max_len: int) -> T5Cache:
        """A decoder cache of max_len positions over the encoder output memory (B, S, C)."""
        w = self.embed_tokens.weight
        self_kv = BatchKVCache(self.cfg.module_config(), memory.size(0), max_len, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            cross = [layer.cross_attn.memory(memory) for layer in self.decoder.layers]
        return T5Cache(self_kv, cross, memory_bias)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def decoder_for(self, prompts: list[list[int]]) -> tuple["EncodedPrompts", list[list[int]]]:
        """Encode the prompts (right-padded, masked) once; return the decoder conditioned on them and
        what it starts from, the decoder start token, for the engine's decode loop."""
        dev = self.embed_tokens.weight.device
        S = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), S), self.cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), S, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
            mask[b, :len(p)] = True
        memory, bias = self.encode(ids.to(dev), mask.to(dev))
        return EncodedPrompts(self, memory, bias), [[self.cfg.decoder_start_token_id] for _ in prompts]


class EncodedPrompts(nn.Module):
    """A T5 decoder conditioned on encoded prompts, seen as a decoder-only model by the engine:
    `new_cache`, `forward(ids, input_pos, cache, last_only, return_hidden)`, `lm_head`, `cfg`, `max_tokens`."""

    def __init__(self, model: T5, memory: torch.Tensor, memory_bias: torch.Tensor):
        super().__init__()
        self.model = model
        self.cfg = model.cfg.module_config()  # vocab_size, no sliding window: what the engine reads
        self.memory, self.memory_bias = memory, memory_bias

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def max_tokens(self) -> int:
        return self.model.max_tokens

    def decoder_for(self, prompts):
        return self, prompts

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None, rolling: bool = False) -> T5Cache:
        if batch_size != self.memory.size(0):
            raise LLMKitError(f"{self.memory.size(0)} prompts were encoded, a cache of {batch_size} rows was asked for")
        return self.model.new_cache(self.memory, self.memory_bias, max_len)

    def forward(self, idx, input_pos=None, cache=None, last_only: bool = False, return_hidden: bool = False):
        return self.model.decode(idx, self.memory, self.memory_bias, input_pos=input_pos, cache=cache,
                                 last_only=last_only, return_hidden=return_hidden)


# ---------------------------------------------------------------- Hugging Face checkpoints
_HF_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_HF_MLP = {"wi": "up_proj", "wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
_ENC_NORMS = {"0": "self_norm", "1": "mlp_norm"}  # HF sub-layer index -> norm
_DEC_NORMS = {"0": "self_norm", "1": "cross_norm", "2": "mlp_norm"}


def state_dict_from_hf_t5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF T5ForConditionalGeneration tensor names -> T5's. Sub-layer 0 is self-attention; in the
    decoder 1 is cross-attention (EncDecAttention) and 2 the MLP, in the encoder 1 the MLP. The
    stacks' copies of the shared embedding and the unused cross-attention bias table are dropped."""
    out = {}
    for k, v in sd.items():
        if k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") or k.endswith(
                "EncDecAttention.relative_attention_bias.weight"):
            continue
        if k == "shared.weight":
            out["embed_tokens.weight"] = v
            continue
        m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(\w+)\.?(\w*)\.weight", k)
        if m:
            stack, i, sub, mod, leaf = m.groups()
            p = f"{stack}.layers.{i}."
            if mod == "SelfAttention" and leaf == "relative_attention_bias":
                k = f"{stack}.rel_bias.weight"
            elif mod in ("SelfAttention", "EncDecAttention") and leaf in _HF_ATTN:
                k = p + ("self_attn." if mod == "SelfAttention" else "cross_attn.") + _HF_ATTN[leaf] + ".weight"
            elif mod == "DenseReluDense" and leaf in _HF_MLP:
                k = p + "mlp." + _HF_MLP[leaf] + ".weight"
            elif mod == "layer_norm" and not leaf:
                norms = _DEC_NORMS if stack == "decoder" else _ENC_NORMS
                if sub in norms:
                    k = p + norms[sub] + ".weight"
        elif k in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
            k = k.split(".")[0] + ".norm.weight"
        out[k] = v
    return out


def state_dict_to_hf_t5(model: T5) -> dict[str, torch.Tensor]:
    """T5's tensors under HF T5ForConditionalGeneration's names (inverse of state_dict_from_hf_t5)."""
    inv_attn = {v: k for k, v in _HF_ATTN.items()}
    gated = model.cfg.mlp_spec()[0] == "swiglu"
    inv_mlp = {"gate_proj": "wi_0", "up_proj": "wi_1" if gated else "wi", "down_proj": "wo"}
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        if k == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if k == "embed_tokens.weight":
            out["shared.weight"] = v
        elif k.endswith("rel_bias.weight"):
            out[f"{k.split('.')[0]}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = v
        elif k.endswith(".norm.weight") and k.count(".") == 2:
            out[f"{k.split('.')[0]}.final_layer_norm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            stack, _, i, mod, rest = k.split(".", 4)
            mlp_sub = "2" if stack == "decoder" else "1"
            p = f"{stack}.block.{i}.layer."
            if mod in ("self_attn", "cross_attn"):
                name = "0.SelfAttention" if mod == "self_attn" else "1.EncDecAttention"
                out[f"{p}{name}.{inv_attn[rest.split('.')[0]]}.weight"] = v
            elif mod == "mlp":
                out[f"{p}{mlp_sub}.DenseReluDense.{inv_mlp[rest.split('.')[0]]}.weight"] = v
            else:
                sub = {"self_norm": "0", "cross_norm": "1", "mlp_norm": mlp_sub}[mod]
                out[f"{p}{sub}.layer_norm.weight"] = v
    return out


def load_hf_t5(d: str | Path, hf: dict | None = None) -> T5:
    """A T5 from a Hugging Face T5ForConditionalGeneration folder (config.json + safetensors), eval mode.
    A stored lm_head.weight that differs from the embedding unties the head, as transformers does."""
    from ..checkpoint.hf import load_state, read_config_json, read_hf_weights

    d = Path(d)
    hf = read_config_json(d) if hf is None else hf
    cfg = T5Config.from_hf(hf, where=str(d / "config.json"))
    sd = state_dict_from_hf_t5(read_hf_weights(d))
    head = sd.get("lm_head.weight")
    emb = sd.get("embed_tokens.weight")
    tie = head is None or (emb is not None and head.shape == emb.shape and torch.equal(head, emb))
    if tie != cfg.tie_embeddings:
        cfg = dataclasses.replace(cfg, tie_embeddings=tie)
    with torch.device("meta"):
        model = T5(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return load_state(model, sd, str(d)).eval()


def save_hf_t5(model: T5, d: str | Path) -> None:
    """config.json + model.safetensors that transformers' T5ForConditionalGeneration reads."""
    import json

    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
    save_file(state_dict_to_hf_t5(model), str(d / "model.safetensors"), metadata={"format": "pt"})
