"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear W (out, in) gets a trainable update of rank r:

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ        A: (r, in), B: (out, r)

A is initialised like a linear layer (Kaiming uniform, as `peft` does) and B to zero, so the
adapted model starts out exactly equal to the base model (sec. 4.1). After training the update
folds into the weights, W' = W + (alpha/r) B A ("merge"), giving a model with no extra latency;
"unmerge" subtracts it again. rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r) instead.

`LoRALinear` wraps any linear-like module (nn.Linear, or a `QuantLinear`: NF4 for QLoRA, int8, int4) under the name
`base_layer`, with `lora_A`/`lora_B` beside it: the same layout as `peft`, so adapter tensor
names match theirs one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .common import freeze, from_peft_key, get_module, load_trainable, match_targets, set_module, to_peft_key
from .registry import PeftMethod, register

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoRAConfig:
    """The `lora:` section of a fine-tuning config (and the arguments of `apply_lora`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False  # scale alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r


class LoRALinear(nn.Module):
    """base_layer(x) + scaling · lora_B(lora_A(dropout(x))). x: (..., in) -> (..., out)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise LLMKitError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_weight(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init of A
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts as the base model
        self.merged = False
        self.enabled = True  # False: the base layer alone (llmkit.peft.disabled, e.g. DPO's reference)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = (self.lora_B.weight * self.scaling).to(x.dtype)  # scaled on the (out, r) matrix, not on (B, T, out)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b)

    @classmethod
    @torch.no_grad()
    def concat(cls, parts: list[LoRALinear]) -> LoRALinear | None:
        """Fuse LoRA-wrapped projections (q/k/v, gate/up): the bases concatenate (`concat_linears`) and
        each part's update stays on its own output slice, as one LoRA of rank sum(r_i) with
        A = cat(A_i) (sum r_i, in) and block-diagonal B = diag(B_1, ..., B_n) (sum out_i, sum r_i):
        outputs are unchanged. Training it afterwards trains the off-diagonal blocks too (a plain
        rank-sum(r_i) LoRA on the fused projection). None when the parts differ in scaling or dropout."""
        from ..models.modules import concat_linears

        first = parts[0]
        p_drop = [m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in parts]
        if any(m.merged or m.scaling != first.scaling for m in parts) or len(set(p_drop)) > 1:
            return None
        base = concat_linears([m.base_layer for m in parts])
        if base is None:
            return None
        r = sum(m.r for m in parts)
        fused = cls(base, r, first.scaling * r, p_drop[0])  # alpha chosen so that alpha / r = the parts' scaling
        fused.scaling = first.scaling
        fused.lora_A.weight.copy_(torch.cat([m.lora_A.weight for m in parts]))
        fused.lora_B.weight.copy_(torch.block_diag(*[m.lora_B.weight for m in parts]))
        for new, old in ((fused.lora_A.weight, first.lora_A.weight), (fused.lora_B.weight, first.lora_B.weight)):
            new.requires_grad_(old.requires_grad)
        return fused.train(first.training)

    def merge(self) -> None:
        if self.merged:
            return
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise LLMKitError("cannot merge LoRA into a quantized base layer; load the base model unquantized "
                              "and apply the adapter there (llmkit merge does)")
        with torch.no_grad():
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def base_weight(m: nn.Module) -> torch.Tensor:
    """A tensor carrying the device of a linear-like module (its weight, or its quantized data)."""
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) else next(m.buffers())


def apply_lora(model: nn.Module, targets=None, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               rslora: bool = False, freeze_base: bool = True) -> nn.Module:
    """Swap each target linear for a LoRALinear (in place) and freeze everything else.

    targets: short names ("q_proj"), full names ("layers.0.mlp.up_proj") or "all-linear";
    default the attention projections. Returns the model.
    """
    from ..quant import QuantLinear

    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LLMKitError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0 <= dropout < 1:
        raise LLMKitError(f"LoRA dropout must be in [0, 1), got {dropout}")
    names = match_targets(model, targets or DEFAULT_TARGETS, kinds=(nn.Linear, QuantLinear))
    cfg = getattr(model, "cfg", None)
    if "lm_head" in names and cfg is not None and cfg.tie_embeddings:
        raise LLMKitError("lm_head shares its weight with embed_tokens in this model; LoRA on it would also change "
                          "the embeddings when merged: target other modules")
    if freeze_base:
        freeze(model)
    for name in names:
        set_module(model, name, LoRALinear(get_module(model, name), r, alpha, dropout, rslora))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (outputs unchanged, no extra latency)."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Merge (optionally) and put the plain base layers back: the model is a plain Transformer again."""
    for name, m in lora_layers(model):
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        set_module(model, name, m.base_layer)
    return model


def set_lora_enabled(model: nn.Module, on: bool) -> None:
    """Switch every LoRA update on or off (off: the model computes as its base model)."""
    layers = lora_layers(model)
    if not on and any(m.merged for _, m in layers):
        raise LLMKitError("a merged LoRA adapter cannot be switched off; unmerge it first")
    for _, m in layers:
        m.enabled = on


def lora_peft_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    """adapter_config.json content for `peft` (LoraConfig fields)."""
    layers = lora_layers(model)
    if not layers:
        raise LLMKitError("model has no LoRA layers to save")
    _, first = layers[0]
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "use_rslora": first.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's keys: {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
    (r, in), ...lora_B.weight: (out, r)}."""
    return {to_peft_key(k): v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    load_trainable(model, {from_peft_key(k): v for k, v in tensors.items()})


def lora_from_peft_config(model: nn.Module, cfg: dict) -> None:
    """Apply the LoRA swaps an adapter_config.json (llmkit's or peft's LoraConfig) describes."""
    targets = cfg.get("target_modules") or None
    if isinstance(targets, str) and targets != "all-linear":
        raise LLMKitError(f"regex target_modules {targets!r} are not supported; list the module names")
    apply_lora(model, targets=targets, r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
               dropout=float(cfg.get("lora_dropout", 0.0)), rslora=bool(cfg.get("use_rslora", False)))


def _apply(model: nn.Module, cfg, tokenizer=None) -> nn.Module:
    c = cfg.lora
    return apply_lora(model, c.targets, c.r, c.alpha, c.dropout, c.rslora)


def _validate(cfg) -> None:
    r = cfg.lora.r
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LLMKitError(f"LoRA rank r must be a positive integer, got {r!r}")


LORA = register(PeftMethod(
    name="lora", default_lr=2e-4, apply=_apply, sections={"lora": LoRAConfig}, validate=_validate,
    peft_type="LORA", is_applied=has_lora, state=lora_state, load_state=load_lora_state,
    peft_config=lora_peft_config, from_peft_config=lora_from_peft_config, unload=unload_lora, mergeable=True,
    set_enabled=set_lora_enabled))
