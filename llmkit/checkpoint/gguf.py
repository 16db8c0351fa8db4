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


def load_gguf(path: str | Path) -> tuple[Transformer, dict]:
    """Build a Transformer (fp32) from a GGUF file; returns (model, metadata)."""
    where = str(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    cfg = config_from_gguf(meta, where)
    names = {t.name for t in reader.tensors}
    cfg.tie_embeddings = "output.weight" not in names
    permute = meta.get("general.architecture") == "llama"
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = _tensor(t, where)
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
                continue
            if mod in _EXPERT_MAP:  # stacked experts (E, out, in)
                for e, we in enumerate(w):
                    sd[f"layers.{i}.mlp.experts.{e}.{_EXPERT_MAP[mod]}.{kind}"] = we.contiguous()
                continue
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
    from .hf import load_state

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return load_state(model, sd, where).eval(), meta
