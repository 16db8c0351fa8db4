"""Hugging Face format: config.json + model.safetensors (or shards + model.safetensors.index.json).

Reads and writes GPT-2, LLaMA, Mistral, Mixtral, Qwen2, DeepSeek-V3 and Gemma 3 (text) checkpoints.
llmkit's module names are HF LLaMA's minus the "model." prefix, so most tensors map by name; GPT-2 (fused
c_attn, Conv1D weights stored (in, out)), Mixtral (block_sparse_moe.experts.e.w1/w2/w3) and Gemma 3 (norm
names, and its (1 + w) norm weights stored as w: llmkit keeps the multiplier) are translated. DeepSeek's
multi-token prediction modules live in HF checkpoints as layers n_layer.. (V3's layers.61): llmkit's
`mtp.k.*` is written there, and read back only when the config asks for them (mtp_depth), as
transformers itself ignores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LLMKitError
from ..models import ModelConfig, Transformer
from ..models.transformer import check_fits_in_memory

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "deepseek": "DeepseekV3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# llmkit family -> HF model_type where they differ
_MODEL_TYPES = {"deepseek": "deepseek_v3", "gemma3": "gemma3_text"}
_FAMILY_OF = {v: k for k, v in _MODEL_TYPES.items()}  # HF model_type -> llmkit family
# Gemma 3 layer norms: HF name -> llmkit name (llmkit keeps LLaMA's post_attention_layernorm = pre-MLP)
_GEMMA3_NORMS = {"post_attention_layernorm": "attn_out_norm", "pre_feedforward_layernorm": "post_attention_layernorm",
                 "post_feedforward_layernorm": "mlp_out_norm"}
_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2")


# ------------------------------------------------------------------ config
def _need(hf: dict, key: str, where: str):
    if key not in hf or hf[key] is None:
        raise LLMKitError(f"{where} is missing field {key!r}")
    return hf[key]


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """rope theta and scaling from either transformers v4 (rope_theta, rope_scaling) or v5 (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or params or None
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("rope_theta", None)
        if kind == "default":
            return float(theta), None
        scaling = {"type": kind, **scaling}
    return float(theta), scaling


def _deepseek_from_hf(hf: dict, where: str, mtp_depth: int = 0) -> ModelConfig:
    """DeepSeek-V3 config.json -> the deepseek family (MLA + DeepSeekMoE). Rope scaling (V3's yarn with
    its mscale on the softmax scale) is not supported: only unscaled rope."""
    theta, scaling = _rope_from_hf(hf)
    if scaling:
        raise LLMKitError(f"{where}: DeepSeek rope scaling {scaling.get('type')!r} is not supported "
                          "(only unscaled rope)")
    if hf.get("attention_bias"):
        raise LLMKitError(f"{where}: attention_bias is not supported")
    n = _need(hf, "num_attention_heads", where)
    return ModelConfig(
        family="deepseek", vocab_size=_need(hf, "vocab_size", where),
        n_layer=_need(hf, "num_hidden_layers", where),
        n_head=n, n_kv_head=n, d_model=_need(hf, "hidden_size", where), d_ff=_need(hf, "intermediate_size", where),
        max_seq_len=hf.get("max_position_embeddings", 4096), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="deepseek_moe", activation=hf.get("hidden_act", "silu"), pos_emb="rope", rope_theta=theta,
        attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=_need(hf, "kv_lora_rank", where),
        qk_nope_head_dim=_need(hf, "qk_nope_head_dim", where), qk_rope_head_dim=_need(hf, "qk_rope_head_dim", where),
        v_head_dim=_need(hf, "v_head_dim", where), rope_interleave=bool(hf.get("rope_interleave", True)),
        n_expert=_need(hf, "n_routed_experts", where), n_expert_per_tok=_need(hf, "num_experts_per_tok", where),
        moe_intermediate_size=_need(hf, "moe_intermediate_size", where),
        n_shared_experts=hf.get("n_shared_experts") or 0,
        first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
        routed_scaling=float(hf.get("routed_scaling_factor", 1.0)), n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, router_scoring="sigmoid",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        tie_embeddings=hf.get("tie_word_embeddings", False), mtp_depth=mtp_depth,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))


# model types read by their own module's loader (dir, config dict) -> model, not by the decoder's mapping
OTHER_LOADERS = {"t5": "llmkit.models.t5:load_hf_t5"}
OTHER_SAVERS = {"t5": "llmkit.models.t5:save_hf_t5"}  # family -> (model, dir) writer


def _other(table: dict, key: str):
    import importlib

    mod, fn = table[key].split(":")
    return getattr(importlib.import_module(mod), fn)


def supported_types() -> str:
    return ", ".join([*(_MODEL_TYPES.get(f, f) for f in ARCHITECTURES), *OTHER_LOADERS])


def config_from_hf(hf: dict, where: str = "config.json", mtp_depth: int = 0) -> ModelConfig:
    """mtp_depth: DeepSeek multi-token prediction modules to read (0: none, as transformers loads)."""
    model_type = hf.get("model_type")
    if model_type == "deepseek_v3":
        return _deepseek_from_hf(hf, where, mtp_depth)
    if _FAMILY_OF.get(model_type, model_type) not in ARCHITECTURES:
        arch = ", ".join(hf.get("architectures") or []) or "no architectures field"
        raise LLMKitError(f"{where}: unsupported model_type {model_type!r} ({arch}); supported: {supported_types()}")
    if model_type == "gpt2":
        d = _need(hf, "n_embd", where)
        act = hf.get("activation_function", "gelu_new")
        return ModelConfig(family="gpt2", vocab_size=_need(hf, "vocab_size", where), n_layer=_need(hf, "n_layer", where),
                           n_head=_need(hf, "n_head", where), d_model=d, d_ff=hf.get("n_inner") or 4 * d,
                           max_seq_len=_need(hf, "n_positions", where), norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                           activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act),
                           pos_emb="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LLMKitError(f"{where}: attention_bias/mlp_bias are not supported")
    if model_type == "gemma3_text":
        return _gemma3_config(hf, where)
    theta, scaling = _rope_from_hf(hf)
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if model_type == "llama":
        window = None
    n_expert = hf.get("num_local_experts", 0) if model_type == "mixtral" else 0
    return ModelConfig(
        family=model_type, vocab_size=_need(hf, "vocab_size", where), n_layer=_need(hf, "num_hidden_layers", where),
        n_head=_need(hf, "num_attention_heads", where), n_kv_head=hf.get("num_key_value_heads"),
        d_model=_need(hf, "hidden_size", where), head_dim=hf.get("head_dim"),
        d_ff=_need(hf, "intermediate_size", where), max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", activation=hf.get("hidden_act", "silu"),
        pos_emb="rope", rope_theta=theta, rope_scaling=scaling, sliding_window=window,
        qkv_bias=model_type == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False),
        n_expert=n_expert or 0, n_expert_per_tok=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))


def _gemma3_config(hf: dict, where: str) -> ModelConfig:
    """Gemma 3 text config: per-layer types (or the old sliding_window_pattern) and two RoPE bases."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key):
            raise LLMKitError(f"{where}: {key} is not supported")
    n_layer = _need(hf, "num_hidden_layers", where)
    types = hf.get("layer_types")
    pattern = hf.get("sliding_window_pattern", 6)
    if types:  # the pattern must be "every n-th layer global", as in every released Gemma 3
        glob = [i for i, t in enumerate(types) if t == "full_attention"]
        pattern = glob[0] + 1 if glob else n_layer + 1
        if [t == "full_attention" for t in types] != [i % pattern == pattern - 1 for i in range(n_layer)]:
            raise LLMKitError(f"{where}: layer_types is not a repeating local/global pattern")
    params = hf.get("rope_parameters") or {}
    full, sliding = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    theta = full.pop("rope_theta", None) or hf.get("rope_theta") or 1e6
    local_theta = sliding.pop("rope_theta", None) or hf.get("rope_local_base_freq") or 1e4
    scaling = hf.get("rope_scaling") or full or None
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling = None if kind == "default" else {"type": kind, **scaling}
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    return ModelConfig(
        family="gemma3", vocab_size=_need(hf, "vocab_size", where), n_layer=n_layer,
        n_head=_need(hf, "num_attention_heads", where), n_kv_head=hf.get("num_key_value_heads"),
        d_model=_need(hf, "hidden_size", where), head_dim=hf.get("head_dim", 256),
        d_ff=_need(hf, "intermediate_size", where), max_seq_len=hf.get("max_position_embeddings", 131072),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        activation={"gelu_pytorch_tanh": "gelu_tanh"}.get(act, act), pos_emb="rope", rope_theta=float(theta),
        rope_scaling=scaling, rope_local_theta=float(local_theta), sliding_window=hf.get("sliding_window", 4096),
        sliding_window_pattern=pattern, qk_norm=True, sandwich_norm=True, embed_scale=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256), tie_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def config_to_hf(cfg: ModelConfig) -> dict:
    family = cfg.family if cfg.family in ARCHITECTURES else ("gpt2" if cfg.pos_emb == "learned" else "llama")
    common = dict(architectures=[ARCHITECTURES[family]], model_type=_MODEL_TYPES.get(family, family),
                  vocab_size=cfg.vocab_size,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
                  eos_token_id=cfg.eos_token_id, torch_dtype="float32")
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation)
        return dict(common, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                    n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function=act)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        rope.update(rope_type=sc.pop("type"), **sc)
    d = dict(common, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
             max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation,
             rope_theta=cfg.rope_theta, rope_parameters=rope,
             rope_scaling=None if rope["rope_type"] == "default" else rope)
    if family == "gemma3":
        n = cfg.sliding_window_pattern
        d.update(hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
                 query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim, sliding_window=cfg.sliding_window,
                 layer_types=["sliding_attention" if cfg.local_layer(i) else "full_attention"
                              for i in range(cfg.n_layer)],
                 rope_parameters={"full_attention": rope, "sliding_attention": {
                     "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}},
                 sliding_window_pattern=n or 1)
        d.pop("rope_theta"), d.pop("rope_scaling"), d.pop("hidden_act")
    if family in ("mistral", "mixtral"):
        d["sliding_window"] = cfg.sliding_window
    if family == "qwen2":
        d.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window,
                 max_window_layers=cfg.n_layer)
    if family == "deepseek":
        if cfg.router_scoring != "sigmoid" or cfg.mlp != "deepseek_moe" or cfg.attention != "mla":
            raise LLMKitError("HF export of the deepseek family needs attention=mla, mlp=deepseek_moe, "
                              "router_scoring=sigmoid (DeepSeek-V3's layout)")
        for k in ("num_key_value_heads", "head_dim", "rope_scaling"):
            d.pop(k)
        d.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
                 n_routed_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size or cfg.d_ff, n_shared_experts=cfg.n_shared_experts,
                 first_k_dense_replace=cfg.first_k_dense_replace, routed_scaling_factor=cfg.routed_scaling,
                 n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                 num_nextn_predict_layers=cfg.mtp_depth, attention_bias=False)
    if family == "mixtral":
        d.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_tok,
                 router_aux_loss_coef=cfg.router_aux_loss_coef)
    return d


# ------------------------------------------------------------------ weights
def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> llmkit names (transposing GPT-2's Conv1D weights and splitting c_attn)."""
    out = {}
    if cfg.family == "gpt2" or cfg.pos_emb == "learned":
        C = cfg.d_model
        for k, v in sd.items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old causal-mask buffers
            if k == "wte.weight":
                out["embed_tokens.weight"] = v
            elif k == "wpe.weight":
                out["embed_positions.weight"] = v
            elif k.startswith("ln_f."):
                out["norm." + k[5:]] = v
            elif k == "lm_head.weight":
                out[k] = v
            elif k.startswith("h."):
                _, i, rest = k.split(".", 2)
                p = f"layers.{i}."
                if rest.startswith("attn.c_attn."):
                    kind = rest.rsplit(".", 1)[1]
                    w = v.t() if kind == "weight" else v  # Conv1D stores (in, out)
                    for name, part in zip(("q_proj", "k_proj", "v_proj"), w.split(C, dim=0)):
                        out[f"{p}self_attn.{name}.{kind}"] = part.contiguous()
                    continue
                table = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                         "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
                mod, kind = rest.rsplit(".", 1)
                if mod not in table:
                    raise LLMKitError(f"unexpected GPT-2 tensor {k!r}")
                if kind == "weight" and mod not in ("ln_1", "ln_2"):
                    v = v.t().contiguous()
                out[f"{p}{table[mod]}.{kind}"] = v
            else:
                raise LLMKitError(f"unexpected GPT-2 tensor {k!r}")
        return out
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        k = k.removeprefix("model.")
        if cfg.family == "deepseek" and k.startswith("layers.") and int(k.split(".")[1]) >= cfg.n_layer:
            depth = int(k.split(".")[1]) - cfg.n_layer  # an MTP module (V3: layers.61)
            rest = k.split(".", 2)[2]
            if depth >= cfg.mtp_depth or rest.startswith(("embed_tokens.", "shared_head.head.")):
                continue  # not asked for, or the shared embedding / head
            k = f"mtp.{depth}." + rest.replace("shared_head.norm.", "norm.")
        if cfg.family == "gemma3":
            k, v = _gemma3_name(k, v, +1.0)
        if ".block_sparse_moe." in k:  # Mixtral: w1 = gate, w3 = up, w2 = down
            k = k.replace(".block_sparse_moe.", ".mlp.")
            k = k.replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj.")
        if k.endswith("mlp.experts.gate_up_proj"):  # transformers v5 fused layout (E, 2F, C)
            pre = k.removesuffix("gate_up_proj")
            for e, w in enumerate(v):
                g, u = w.chunk(2, dim=0)
                out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = g, u
            continue
        if k.endswith("mlp.experts.down_proj"):
            pre = k.removesuffix("down_proj")
            for e, w in enumerate(v):
                out[f"{pre}{e}.down_proj.weight"] = w
            continue
        out[k] = v
    return out


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # shared with the embedding; HF re-ties on load
    out = {}
    if cfg.family == "gpt2":
        for k, v in sd.items():
            if k == "embed_tokens.weight":
                out["transformer.wte.weight"] = v
            elif k == "embed_positions.weight":
                out["transformer.wpe.weight"] = v
            elif k.startswith("norm."):
                out["transformer.ln_f." + k[5:]] = v
            elif k == "lm_head.weight":
                out[k] = v
            elif ".self_attn.q_proj." in k:
                i, kind = k.split(".")[1], k.rsplit(".", 1)[1]
                parts = [sd[k.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
                w = torch.cat(parts, dim=0)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (w.t() if kind == "weight" else w).contiguous()
            elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                continue
            else:
                _, i, rest = k.split(".", 2)
                mod, kind = rest.rsplit(".", 1)
                table = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
                         "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
                if kind == "weight" and "layernorm" not in mod:
                    v = v.t().contiguous()
                out[f"transformer.h.{i}.{table[mod]}.{kind}"] = v
        return out
    back = {v: k for k, v in _GEMMA3_NORMS.items()}
    for k, v in sd.items():
        if cfg.family == "gemma3":
            k, v = _gemma3_name(k, v, -1.0, back)
        if cfg.family == "mixtral" and ".mlp." in k:
            k = k.replace(".mlp.", ".block_sparse_moe.")
            k = k.replace(".gate_proj.", ".w1.").replace(".up_proj.", ".w3.").replace(".down_proj.", ".w2.")
        if k.startswith("mtp."):  # DeepSeek MTP module d -> layers.{n_layer + d} (V3's layout)
            _, depth, rest = k.split(".", 2)
            rest = "shared_head.norm." + rest[5:] if rest.startswith("norm.") else rest
            k = f"layers.{cfg.n_layer + int(depth)}.{rest}"
        out[k if k == "lm_head.weight" else "model." + k] = v
    return out


def _gemma3_name(k: str, v: torch.Tensor, shift: float, table: dict = _GEMMA3_NORMS) -> tuple[str, torch.Tensor]:
    """Rename a Gemma 3 layer norm (`table`: HF -> llmkit, or back) and move any norm weight by `shift`
    (+1 reading HF's (1 + w) parametrisation into llmkit's multiplier, -1 writing it back)."""
    parts = k.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] in table:
        k = ".".join([parts[0], parts[1], table[parts[2]], parts[3]])
    if k.endswith("norm.weight"):
        v = v.float() + shift
    return k, v


# ------------------------------------------------------------------ files
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMKitError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def weight_files(d: Path) -> list[str]:
    """The safetensors files of a checkpoint folder: the shards its index names, else model.safetensors."""
    index = d / "model.safetensors.index.json"
    if not index.exists():
        return ["model.safetensors"]
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LLMKitError(f"{index} is not a valid safetensors index ({e})") from None
    root = d.resolve()
    for f in files:  # an index names files inside its folder, never ../ or absolute paths (or links out of it)
        if not isinstance(f, str) or not (d / f).resolve().is_relative_to(root):
            raise LLMKitError(f"{index} names a weight file outside its folder: {f!r}")
    return files


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    files = weight_files(d)
    if files == ["model.safetensors"] and not (d / files[0]).exists():
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise LLMKitError(f"{d} holds only pickle weights (.bin/.pt); llmkit never unpickles: "
                              "convert to safetensors")
        raise LLMKitError(f"{d} has no model.safetensors or model.safetensors.index.json")
    sd = {}
    for f in files:
        sd.update(read_safetensors(d / f))
    return sd


def read_config_json(d: Path) -> dict:
    p = d / "config.json"
    if not p.exists():
        raise LLMKitError(f"{d} is not a model directory (no config.json)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise LLMKitError(f"{p} is not valid JSON ({e})") from None


def load_state(model: Transformer, sd: dict[str, torch.Tensor], where: str) -> Transformer:
    """Copy tensors into model, with a plain error for missing/unexpected/mis-shaped tensors."""
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise LLMKitError(f"{where}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LLMKitError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the config expects "
                              f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)
    return model


def load_quantized_state(cfg: ModelConfig, layers: dict[str, str], sd: dict[str, torch.Tensor],
                         where: str) -> Transformer:
    """Meta-device model -> empty quantized modules for `layers` ({name: method}) -> assign `sd` (the
    quantized tensors in state-dict layout, dense ones as they are): no full-precision copy of a
    quantized weight ever exists. A tied model whose head and embedding are both quantized shares the
    head's table (`QuantEmbedding.tied`); one whose head only is quantized keeps a dense embedding."""
    from ..quant import QuantEmbedding, swap_empty

    if not isinstance(layers, dict) or not layers:
        raise LLMKitError(f"{where}: quantization has no layers")
    with torch.device("meta"):
        model = Transformer(cfg)
    swap_empty(model, layers)
    if cfg.tie_embeddings and "lm_head" in layers and "embed_tokens" in layers:
        model.embed_tokens = QuantEmbedding.tied(model.lm_head)
    tied = cfg.tie_embeddings and "lm_head" not in layers
    if tied:
        sd.pop("lm_head.weight", None)
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {result.unexpected_keys[0]!r}"
        raise LLMKitError(f"{where}: {what} ({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LLMKitError(f"{where}: tensor {left[0]!r} was not loaded")
    model._rope = None
    return model.eval()


def load_hf_model(d: str | Path, cfg: ModelConfig | None = None) -> Transformer:
    """Build a Transformer from an HF model directory (any supported family; a T5 folder gives a
    models.t5.T5 through OTHER_LOADERS)."""
    d = Path(d)
    if cfg is None:
        hf = read_config_json(d)
        if hf.get("model_type") in OTHER_LOADERS:
            return _other(OTHER_LOADERS, hf["model_type"])(d, hf)
        cfg = config_from_hf(hf, where=str(d / "config.json"))
    sd = read_hf_weights(d)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_fits_in_memory(cfg, "cpu")  # before to_empty allocates
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if cfg.pos_emb == "rope":
        model._rope = None
    return load_state(model, state_dict_from_hf(sd, cfg), str(d)).eval()


def save_hf_model(model: Transformer, d: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) into directory d."""
    d = Path(d)
    if model.cfg.family in OTHER_SAVERS:
        return _other(OTHER_SAVERS, model.cfg.family)(model, d)
    d.mkdir(parents=True, exist_ok=True)
    sd = state_dict_to_hf(model)
    (d / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
