"""Read GGUF files (llama.cpp's format): config from metadata, tensors dequantised to fp32.

Files are opened and their metadata read by `llmkit.gguf_io`, the reader the tokenizer shares.

Dequantisation is done by the `gguf` package (the reference Python implementation that ships
with llama.cpp). llama.cpp's converter permutes the rows of attn_q/attn_k of LLaMA models from
HF's rotate-half rope layout to its interleaved one; we permute them back. GPT-2 files ("gpt2") hold
q/k/v fused as attn_qkv, split here.

Gemma 3 ("gemma3"): llama.cpp hard-codes what the metadata does not say (llama-model.cpp): every 6th
layer global, the others within attention.sliding_window, whose RoPE base is 10000; the query scale
is 1/sqrt(key_length), but 1/sqrt(C/H) for the 62-layer 27B (as its query_pre_attn_scalar). Its converter
already folded Gemma's (1 + w) into the norm weights, which is llmkit's convention, and Gemma's rope is
NEOX-style (rotate-half), so nothing is permuted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LLMKitError
from ..gguf_io import metadata, open_gguf
from ..models import ModelConfig, Transformer

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3", "gpt2")
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0  # llama.cpp: hparams.set_swa_pattern(6), rope_freq_base_train_swa


def config_from_gguf(meta: dict, where: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LLMKitError(f"{where}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise LLMKitError(f"{where}: GGUF metadata is missing {full!r}")
        return meta[full]

    n_head = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or None
    if not vocab:
        raise LLMKitError(f"{where}: GGUF metadata gives no vocabulary size")
    if arch == "gpt2":  # LayerNorm, tanh GELU, learned positions, biases (llama.cpp's gpt2 graph)
        return ModelConfig(family="gpt2", norm="layernorm", mlp="gelu", activation="gelu_tanh", pos_emb="learned",
                           bias=True, vocab_size=int(vocab), n_layer=int(need("block_count")), n_head=n_head,
                           d_model=d_model, d_ff=int(need("feed_forward_length")),
                           max_seq_len=int(need("context_length")),
                           norm_eps=float(need("attention.layer_norm_epsilon")),
                           tie_embeddings=False, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                           eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if arch == "gemma3":
        head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_head))
        n_layer = int(need("block_count"))
        window = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0) or None
        return ModelConfig(
            family="gemma3", vocab_size=int(vocab), n_layer=n_layer, n_head=n_head,
            n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv", n_head)), d_model=d_model, head_dim=head_dim,
            d_ff=int(need("feed_forward_length")), max_seq_len=int(need("context_length")),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")), mlp="swiglu", activation="gelu_tanh",
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 1e6)), rope_scaling=scaling,
            rope_local_theta=GEMMA3_LOCAL_THETA, sliding_window=window,
            sliding_window_pattern=GEMMA3_PATTERN if window else 0, qk_norm=True, sandwich_norm=True,
            embed_scale=True, query_pre_attn_scalar=d_model // n_head if n_layer == 62 else head_dim,
            tie_embeddings=True,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    return ModelConfig(
        family="qwen2" if arch == "qwen2" else ("mixtral" if n_expert else "llama"),
        vocab_size=int(vocab), n_layer=int(need("block_count")), n_head=n_head,
        n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv", n_head)), d_model=d_model,
        head_dim=int(meta.get(f"{arch}.attention.key_length", d_model // n_head)),
        d_ff=int(need("feed_forward_length")), max_seq_len=int(need("context_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        qkv_bias=arch == "qwen2", n_expert=n_expert,
        n_expert_per_tok=int(meta.get(f"{arch}.expert_used_count", 2) or 2),
        tie_embeddings=False,  # decided below from the presence of output.weight
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rope permutation of attn_q/attn_k rows: interleaved pairs -> rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(t, where: str) -> torch.Tensor:
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise LLMKitError(f"{where}: tensor {t.name!r} has unsupported type {kind} "
                          f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    try:
        arr = dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise LLMKitError(f"{where}: cannot read tensor {t.name!r} ({type(e).__name__}: {e}); truncated file?") from None
    shape = tuple(int(x) for x in reversed(t.shape))  # GGML lists dims fastest-first
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # copy: the reader maps the file read-only


_LAYER_MAP = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "ffn_gate_inp": "mlp.gate", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "post_attention_norm": "attn_out_norm", "post_ffw_norm": "mlp_out_norm"}  # the last four: Gemma 3
_EXPERT_MAP = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


# ---------------------------------------------------------------- quantized loading
# GGUF's 4-bit blocks are all one affine code per 32 weights, w = s q + m with q in [0, 15]:
#   Q4_0 (18 bytes / 32): fp16 d, 16 bytes of nibbles;           s = d, m = -8 d
#   Q4_1 (20 bytes / 32): fp16 d, fp16 m, 16 bytes of nibbles;   s = d, m = m
#   Q4_K (144 bytes / 256): fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, mn) per 32, 128 bytes of nibbles;
#        s = d sc, m = -dmin mn   (ggml-quants.c dequantize_row_q4_K)
# which is llmkit's int4 layout (quant.methods.INT4: groups of 32, (s, z = m + 8 s)) with the codes as
# they are; only s and z are rounded, to the bf16 that torch's int4 kernel takes (relative 2^-9).
_INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
_DENSE_TYPES = {"F32", "F16", "BF16"}
_LINEAR_MODS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def _int4_affine(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1/Q4_K tensor's raw blocks -> codes (G, 32) uint8, s (G,) and m (G,) fp32, G = n / 32
    groups in row-major order (the codes are read, never dequantized)."""
    kind = t.tensor_type.name
    raw = torch.from_numpy(np.array(t.data, copy=True).reshape(-1))  # the reader maps the file read-only
    if kind == "Q4_K":
        from gguf.quants import Q4_K

        b = raw.view(-1, 144)
        d, dmin = b[:, 0:2].contiguous().view(torch.float16).float(), b[:, 2:4].contiguous().view(torch.float16).float()
        sc, mn = (torch.from_numpy(a.astype(np.float32)) for a in Q4_K.get_scale_min(b[:, 4:16].numpy()))  # (nb, 8)
        qs = b[:, 16:].reshape(-1, 4, 1, 32)  # 4 chunks of 32 bytes: low nibbles group 2j, high 2j + 1
        codes = torch.cat([qs & 15, qs >> 4], 2).reshape(-1, 32)
        return codes, (d * sc).reshape(-1), (-dmin * mn).reshape(-1)
    size = 18 if kind == "Q4_0" else 20
    b = raw.view(-1, size)
    d = b[:, 0:2].contiguous().view(torch.float16).float()[:, 0]
    m = -8 * d if kind == "Q4_0" else b[:, 2:4].contiguous().view(torch.float16).float()[:, 0]
    qs = b[:, size - 16:]
    return torch.cat([qs & 15, qs >> 4], 1), d, m  # elements 0-15 in the low nibbles, 16-31 in the high


def _quantized_tensors(t, n_rows_head: int | None, where: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(method, storage tensors) for a GGUF weight (N, K), or None to keep it dense (F16/F32/BF16, or
    a shape no method takes). n_rows_head: the head count whose rope permutation to undo (attn_q/k).
      Q4_0/Q4_1/Q4_K -> int4 (the codes as they are);
      Q8_0 and, for the embedding table, any quantized type -> int8 (per-row absmax: a re-rounding,
        measured in tests/test_gguf_quant.py; per-32 int8 has no kernel);
      Q5_x/Q6_K and others -> bf16 (5-6-bit codes need more than int4, and bf16 keeps them to 2^-9)."""
    from ..quant.methods import BF16, INT4, INT8

    kind = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(t.shape))
    if kind in _DENSE_TYPES or len(shape) != 2:
        return None
    N, K = shape
    if kind in _INT4_TYPES and INT4.accepts(N, K):
        codes, s, m = _int4_affine(t)
        codes, s, m = codes.reshape(N, K), s.reshape(N, K // 32), m.reshape(N, K // 32)
        if n_rows_head:
            codes, s, m = (_unpermute(x, n_rows_head) for x in (codes, s, m))
        scales = torch.stack([s.t(), (m + 8 * s).t()], -1).to(torch.bfloat16).contiguous()  # (K/32, N, 2)
        return "int4", {"qweight": codes[:, 0::2] | (codes[:, 1::2] << 4), "scales": scales}
    w = _tensor(t, where)  # this one tensor in fp32, for the re-rounding methods
    if n_rows_head:
        w = _unpermute(w, n_rows_head)
    rec = INT8 if (kind == "Q8_0" or kind in _INT4_TYPES) and INT8.accepts(N, K) else BF16
    return rec.name, rec.quantize(w)


def _load_quantized(reader, meta: dict, cfg: ModelConfig, where: str) -> Transformer:
    """The quantized weights into QuantLinear / QuantEmbedding modules, the rest dense (fp32)."""
    from .hf import load_quantized_state

    permute = meta.get("general.architecture") == "llama"
    sd: dict[str, torch.Tensor] = {}
    layers: dict[str, str] = {}
    for t in reader.tensors:
        name, kind = t.name, t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            _tensor(t, where)  # the unsupported-type error
        target, heads = None, None
        if name == "token_embd.weight" and kind not in _DENSE_TYPES:
            target = "lm_head" if cfg.tie_embeddings else "embed_tokens"  # a tied table lives in the head
        elif name == "output.weight":
            target = "lm_head"
        elif name.startswith("blk.") and name.endswith(".weight") and name.split(".")[2] in _LINEAR_MODS:
            _, i, mod, _ = name.split(".", 3)
            target = f"layers.{i}.{_LAYER_MAP[mod]}"
            heads = (cfg.n_head if mod == "attn_q" else cfg.n_kv_head if mod == "attn_k" else None) if permute else None
        q = _quantized_tensors(t, heads, where) if target else None
        if q is not None and name == "token_embd.weight" and q[0] != "int8":  # the table is gathered by rows
            from ..quant.methods import INT8

            q = "int8", INT8.quantize(_tensor(t, where))
        if q is None:
            _dense_into(sd, t, _tensor(t, where), cfg, permute, where)
            continue
        layers[target] = q[0]
        sd.update({f"{target}.{k}": v for k, v in q[1].items()})
        if name == "token_embd.weight" and cfg.tie_embeddings:
            layers["embed_tokens"] = q[0]  # QuantEmbedding.tied(lm_head)
    if not layers:  # nothing quantized in the file (F16/F32): the dense model
        with torch.device("meta"):
            model = Transformer(cfg)
        from .hf import load_state

        model = model.to_empty(device="cpu")
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return load_state(model, sd, where).eval()
    return load_quantized_state(cfg, layers, sd, where)


def load_gguf(path: str | Path, quantized: bool = False) -> tuple[Transformer, dict]:
    """Build a Transformer from a GGUF file; returns (model, metadata). Dense (fp32, every tensor
    dequantized) by default; quantized=True loads the quantized weights into QuantLinear /
    QuantEmbedding modules without an fp32 copy of the model (see `_quantized_tensors` for which
    GGUF type becomes which method). GPT-2 (fused q/k/v) and MoE files (stacked experts) load dense."""
    where = str(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    cfg = config_from_gguf(meta, where)
    names = {t.name for t in reader.tensors}
    cfg.tie_embeddings = "output.weight" not in names
    if quantized and cfg.family != "gpt2" and not cfg.n_expert:
        return _load_quantized(reader, meta, cfg, where), meta
    permute = meta.get("general.architecture") == "llama"
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        _dense_into(sd, t, _tensor(t, where), cfg, permute, where)
    from .hf import load_state

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return load_state(model, sd, where).eval(), meta


def _dense_into(sd: dict, t, w: torch.Tensor, cfg: ModelConfig, permute: bool, where: str) -> None:
    """Put GGUF tensor `t` (dequantized: w) into the llmkit state dict under its llmkit name(s)."""
    name = t.name
    if name == "token_embd.weight":
        sd["embed_tokens.weight"] = w
    elif name in ("output_norm.weight", "output_norm.bias"):
        sd["norm." + name.rsplit(".", 1)[1]] = w
    elif name == "position_embd.weight":
        sd["embed_positions.weight"] = w
    elif name == "output.weight":
        sd["lm_head.weight"] = w
    elif name.startswith("blk."):
        _, i, mod, kind = name.split(".", 3)
        if mod == "attn_qkv":  # GPT-2's fused rows q, k, v
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.split(cfg.n_head * cfg.head_dim)):
                sd[f"layers.{i}.self_attn.{proj}.{kind}"] = part.contiguous()
            return
        if mod in _EXPERT_MAP:  # stacked experts (E, out, in)
            for e, we in enumerate(w):
                sd[f"layers.{i}.mlp.experts.{e}.{_EXPERT_MAP[mod]}.{kind}"] = we.contiguous()
            return
        if mod not in _LAYER_MAP:
            raise LLMKitError(f"{where}: unexpected tensor {name!r}")
        if permute and mod == "attn_q":
            w = _unpermute(w, cfg.n_head)
        elif permute and mod == "attn_k":
            w = _unpermute(w, cfg.n_kv_head)
        target = _LAYER_MAP[mod]
        if cfg.n_expert and mod in ("ffn_gate", "ffn_up", "ffn_down"):
            raise LLMKitError(f"{where}: per-expert tensor layout {name!r} is not supported")
        sd[f"layers.{i}.{target}.{kind}"] = w
    elif name.startswith("rope_freqs"):
        raise LLMKitError(f"{where}: GGUF rope_freqs tensors (llama3 rope scaling) are not supported")
    else:
        raise LLMKitError(f"{where}: unexpected tensor {name!r}")
