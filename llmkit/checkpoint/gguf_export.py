"""Write GGUF files (llama.cpp's format): the inverse of `checkpoint.gguf`, so a model trained here runs in
llama.cpp, ollama and LM Studio.

    save_gguf(model, tokenizer, "model.gguf", qtype="q8_0")

What is written, following llama.cpp's own converter (convert_hf_to_gguf.py):
  * metadata: `general.*`, the architecture's hyper-parameters (`llama.block_count`, ...) and the
    tokenizer (`tokenizer.ggml.*`: model "gpt2" = byte-level BPE, tokens spelled in GPT-2's byte
    alphabet, token types, merges, bos/eos/pad ids, add_bos, the pre-tokenizer name, the chat template);
  * tensors: 2-D weights in the requested type (quantized by the `gguf` package, the reference
    implementation llama.cpp ships), 1-D tensors (norms, biases) always F32 as llama.cpp expects; a
    weight whose rows do not split into the type's blocks (32 values) falls back to F16, as the
    converter does;
  * LLaMA's attn_q/attn_k rows permuted from HF's rotate-half rope layout to llama.cpp's interleaved
    pairs (`checkpoint.gguf._unpermute` undoes it on reading), so an F32 export reads back exactly.

Families are records in `ARCHS` (family -> llama.cpp architecture, its config check, tensor names and
hyper-parameters): llama, mistral and mixtral (which llama.cpp runs as "llama"), qwen2, gpt2 (q/k/v
fused into attn_qkv); `checkpoint.gguf` reads all of them back. A quantized llmkit model (QuantLinear)
is dequantized to fp32 and quantized again into the GGUF type: for int4 -> q4_1 this gives back the same
4-bit codes (llmkit's int4 is Q4_1's layout; min and max are codes 0 and 15 of every group), only the
scale and minimum are rounded from bf16 to Q4_1's f16.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LLMKitError, closest
from ..models import ModelConfig, Transformer

# --type values -> (GGML tensor type name, general.file_type name). BF16/Q5_x: also written by gguf-py.
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
         "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}

# HF byte-level BPE pre-tokenizes with GPT-2's regex; llama.cpp calls that pre-tokenizer "gpt-2"
# (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2), and llmkit's reader gives unlisted names GPT-2's regex too.
GPT2_PRE = "gpt-2"


# ------------------------------------------------------------------ tensors
def dense_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors in fp32 under llmkit's names, quantized layers (QuantLinear) dequantized."""
    from ..quant import QuantLinear

    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for name, m in quant.items():
        out[f"{name}.weight"] = m.dequantize(torch.float32)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.float()
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in quant:
            out[k] = v.detach().float()
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # llama.cpp falls back to token_embd when output.weight is absent
    return out


_TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "embed_positions.weight": "position_embd.weight",
              "norm.weight": "output_norm.weight", "norm.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "mlp.gate": "ffn_gate_inp"}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute):
    per head, rows (0..d/2-1, d/2..d-1) become (0, d/2, 1, d/2+1, ...). w: (n_head * d, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _renamed(sd: dict[str, torch.Tensor], cfg: ModelConfig, permute: bool) -> dict[str, torch.Tensor]:
    """llmkit names -> GGUF names; q/k rows permuted for llama.cpp's rope when `permute`; Mixtral's
    experts stacked (E, out, in)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in _TOP_NAMES:
            out[_TOP_NAMES[k]] = v
            continue
        if not k.startswith("layers."):
            raise LLMKitError(f"cannot export tensor {k!r} to GGUF")
        _, i, rest = k.split(".", 2)
        mod, kind = rest.rsplit(".", 1)
        if mod.startswith("mlp.experts."):  # mlp.experts.{e}.{gate,up,down}_proj
            _, _, e, proj = mod.split(".")
            experts.setdefault((i, proj), {})[int(e)] = v
            continue
        if mod not in _LAYER_NAMES:
            raise LLMKitError(f"cannot export tensor {k!r} to GGUF (fused or adapted layers: export the plain model)")
        if permute and mod in ("self_attn.q_proj", "self_attn.k_proj"):
            v = permute_qk(v, cfg.n_head if mod == "self_attn.q_proj" else cfg.n_kv_head)
        out[f"blk.{i}.{_LAYER_NAMES[mod]}.{kind}"] = v
    for (i, proj), parts in experts.items():
        out[f"blk.{i}.{_EXPERT_NAMES[proj]}.weight"] = torch.stack([parts[e] for e in sorted(parts)])
    return out


def _llama_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _renamed(sd, cfg, permute=True)


def _qwen2_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _renamed(sd, cfg, permute=False)  # llama.cpp's qwen2 uses NEOX (rotate-half) rope: no permutation


def _gpt2_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 as llama.cpp's "gpt2": q/k/v fused into attn_qkv (rows q, k, v: HF's c_attn transposed)."""
    out = _renamed(sd, cfg, permute=False)
    for i in range(cfg.n_layer):
        for kind in ("weight", "bias"):
            parts = [out.pop(f"blk.{i}.attn_{p}.{kind}") for p in "qkv"]
            out[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(parts)
    return out


# ------------------------------------------------------------------ hyper-parameters
def _common_hparams(w, cfg: ModelConfig) -> None:
    w.add_vocab_size(cfg.vocab_size)
    # Mistral's sliding window: llama.cpp's "llama" attends to the whole context, so the context is
    # capped at the window, where the two agree
    w.add_context_length(min(cfg.max_seq_len, cfg.sliding_window or cfg.max_seq_len))
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)


def _llama_hparams(w, cfg: ModelConfig) -> None:
    """The keys `checkpoint.gguf.config_from_gguf` and llama.cpp's llama/qwen2 loaders read."""
    import gguf

    _common_hparams(w, cfg)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.d_model // cfg.n_head:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling:  # linear only (the record's check refuses others)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_per_tok)


def _gpt2_hparams(w, cfg: ModelConfig) -> None:
    _common_hparams(w, cfg)
    w.add_layer_norm_eps(cfg.norm_eps)


# ------------------------------------------------------------------ families
@dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture is written: its name, `check(cfg)` -> why llama.cpp cannot run this
    config (or None), `tensors(state, cfg)` -> {GGUF name: fp32 tensor}, `hparams(writer, cfg)`."""
    name: str
    check: Callable[[ModelConfig], str | None]
    tensors: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]
    hparams: Callable[..., None]


def _requires(**want) -> Callable[[ModelConfig], str | None]:
    """check: the config's fields that differ from what the architecture computes, in words."""
    def check(cfg: ModelConfig) -> str | None:
        bad = [f"{k}={getattr(cfg, k)!r}" for k, v in want.items() if getattr(cfg, k) != v]
        if bad:
            return ", ".join(bad)
        if cfg.rope_scaling and cfg.rope_scaling.get("type") != "linear":
            return f"rope scaling {cfg.rope_scaling.get('type')!r} (only linear is written)"
        return None
    return check


_LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "activation": "silu", "pos_emb": "rope", "causal": True, "bias": False}
ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", _requires(**_LLAMA, qkv_bias=False), _llama_tensors, _llama_hparams),
    # llama.cpp runs Mistral and Mixtral (with expert_count) as "llama"
    "mistral": GGUFArch("llama", _requires(**_LLAMA, qkv_bias=False), _llama_tensors, _llama_hparams),
    "mixtral": GGUFArch("llama", _requires(**_LLAMA, qkv_bias=False), _llama_tensors, _llama_hparams),
    "qwen2": GGUFArch("qwen2", _requires(**_LLAMA, qkv_bias=True), _qwen2_tensors, _llama_hparams),
    # llama.cpp's gpt2: LayerNorm, tanh-approximated GELU, learned positions, biases everywhere
    "gpt2": GGUFArch("gpt2", _requires(norm="layernorm", mlp="gelu", activation="gelu_tanh", pos_emb="learned",
                                       causal=True, bias=True), _gpt2_tensors, _gpt2_hparams),
}


def arch_for(cfg: ModelConfig) -> GGUFArch:
    """The GGUF architecture record for `cfg`, or a one-line error naming what is supported."""
    supported = ", ".join(ARCHS)
    rec = ARCHS.get(cfg.family)
    if rec is None:
        raise LLMKitError(f"cannot export family {cfg.family!r} to GGUF (llama.cpp architectures written: "
                          f"{supported})")
    why = rec.check(cfg)
    if why:
        raise LLMKitError(f"cannot export this {cfg.family} model to GGUF: llama.cpp's {rec.name!r} "
                          f"architecture does not run {why} (supported families: {supported})")
    return rec


def check_type(qtype: str) -> str:
    if qtype not in TYPES:
        raise LLMKitError(f"unknown GGUF type {qtype!r}{closest(qtype, TYPES)} (known: {', '.join(TYPES)})")
    return qtype


def gguf_tensors(model: Transformer, arch: GGUFArch) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: fp32 tensor in GGUF row order} of `model` for `arch`."""
    return arch.tensors(dense_state_dict(model), model.cfg)


def encode_tensor(name: str, w: torch.Tensor, qtype: str):
    """(numpy data, GGML type) of one tensor as written: 1-D tensors and the MoE router F32 (as
    llama.cpp's converter keeps them), others in `qtype`, F16 when rows do not split into blocks."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = w.detach().float().cpu().numpy()
    kind = Q[TYPES[qtype][0]]
    if a.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        kind = Q.F32
    elif a.shape[-1] % GGML_QUANT_SIZES[kind][0]:
        kind = Q.F16
    return quantize(np.ascontiguousarray(a), kind), kind


# ------------------------------------------------------------------ tokenizer
def _tokenizer_metadata(tok, vocab_size: int) -> dict:
    """The tokenizer.ggml.* values of a byte-level BPE `Tokenizer` padded to the model's `vocab_size`
    (ids the tokenizer lacks become "[PAD{i}]", type UNUSED, as the converter writes them)."""
    from gguf import TokenType

    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not tok.is_byte_level:
        raise LLMKitError("GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2'); this "
                          f"tokenizer is {model.get('type')!r}"
                          + ("" if tok.is_byte_level else " without a ByteLevel decoder"))
    if tok.vocab_size > vocab_size:
        raise LLMKitError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} embeddings")
    added = tok.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.hf.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = {"model": "gpt2", "pre": GPT2_PRE, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": tok.add_bos, "chat_template": tok.chat_template}
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if i is not None:
            meta[key] = i
    return meta


# ------------------------------------------------------------------ file
def write_gguf(model: Transformer, tokenizer, path: str | Path, qtype: str = "f16", name: str = "llmkit model",
               progress: bool = False) -> dict:
    """Write `model` (+ `tokenizer`, may be None) to the GGUF file `path` (the caller makes it atomic).
    Returns {GGUF tensor name: GGML type name} of what was written."""
    import gguf

    check_type(qtype)
    cfg = model.cfg
    arch = arch_for(cfg)
    tensors = gguf_tensors(model, arch)
    w = gguf.GGUFWriter(str(path), arch.name)
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType[TYPES[qtype][1]]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch.hparams(w, cfg)
    if tokenizer is not None:
        t = _tokenizer_metadata(tokenizer, cfg.vocab_size)
        w.add_tokenizer_model(t["model"])
        w.add_tokenizer_pre(t["pre"])
        w.add_token_list(t["tokens"])
        w.add_token_types(t["types"])
        w.add_token_merges(t["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if key in t:
                add(int(t[key]))
        w.add_add_bos_token(bool(t["add_bos"]))
        w.add_add_eos_token(False)
        if t["chat_template"]:
            w.add_chat_template(t["chat_template"])
    from ..progress import progress_bar

    written = {}
    bar = progress_bar(total=len(tensors), enabled=progress, desc=f"gguf[{qtype}]", unit="tensor")
    for tname, tensor in tensors.items():
        data, kind = encode_tensor(tname, tensor, qtype)
        bar.update(1)
        w.add_tensor(tname, data, raw_dtype=kind)  # quantized data: (rows, bytes) uint8, shape derived
        written[tname] = kind.name
    bar.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def save_gguf(model: Transformer, tokenizer, path: str | Path, qtype: str = "f16", force: bool = False,
              name: str = "llmkit model", progress: bool = False) -> dict:
    """`write_gguf` into `path` atomically (a temp file renamed on success); refuses to overwrite unless force."""
    from ..io import atomic_path, check_overwrite

    check_type(qtype)
    arch_for(model.cfg)  # fail before creating anything
    check_overwrite(path, force)
    with atomic_path(path) as tmp:
        return write_gguf(model, tokenizer, tmp, qtype=qtype, name=name, progress=progress)


def save_ollama(model: Transformer, tokenizer, out_dir: str | Path, qtype: str = "f16", force: bool = False,
                name: str = "llmkit model", temperature: float = 0.0, progress: bool = False) -> Path:
    """Directory `out_dir` holding model.gguf and the Modelfile that imports it into ollama
    (`ollama create NAME -f out_dir/Modelfile`), written atomically as one directory."""
    from ..io import atomic_dir
    from .ollama import modelfile

    check_type(qtype)
    arch_for(model.cfg)
    text = modelfile("model.gguf", tokenizer, model.cfg, temperature)  # template errors before any writing
    with atomic_dir(out_dir, force=force, owns=("*.gguf", "Modelfile")) as tmp:
        write_gguf(model, tokenizer, tmp / "model.gguf", qtype=qtype, name=name, progress=progress)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return Path(out_dir)
