"""AdamW with weight-decay parameter groups."""

from __future__ import annotations

import torch
import torch.nn as nn

from .mfu import cpu_has_fast_bf16


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights, dim >= 2); never biases or norm gains.

    Decaying gains/biases pulls them to 0, which hurts (as in GPT-2 / nanoGPT / LLaMA training).
    Tied weights appear once (named_parameters deduplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over `param_groups`; fused kernel on CUDA."""
    if fused is None:
        fused = any(p.is_cuda for p in model.parameters())
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)


# ---------------------------------------------------------------- Muon
# Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; used by the
# modded-nanogpt and nanochat speedruns): SGD-momentum whose update for each hidden weight matrix is
# replaced by the nearest semi-orthogonal matrix, so every direction of the update gets the same size.
# Embeddings, the output head and the 1-D gains/biases keep AdamW. The update is scaled by
# 0.2·sqrt(max(A, B)) (Liu et al. 2025, "Muon is Scalable for LLM Training") so its RMS matches
# AdamW's and the AdamW learning rate and weight decay carry over.

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton–Schulz coefficients from Jordan et al.


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """≈ U Vᵀ for G = U S Vᵀ, G (A, B) or a stack (N, A, B): the quintic iteration
    X ← aX + (bXXᵀ + c(XXᵀ)²)X pushes every singular value of the normalised G towards 1 (into
    ~[0.7, 1.2], which is all Muon needs). `dtype` bfloat16 is what Jordan et al. and torch.optim.Muon
    use: the iteration is self-correcting, so bf16 rounding does not accumulate."""
    a, b, c = NS_COEFFS
    X = G.float()
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)  # spectral ≤ Frobenius: inside the basin
    wide = X.size(-2) <= X.size(-1)
    if not wide:  # iterate on the smaller Gram matrix (A, A) with A ≤ B
        X = X.mT
    # b M + c M M and a X + B X as one GEMM each with its scalars folded in (torch.optim.Muon's addmm form):
    # no separate scale and add passes over M and X
    fma = torch.addmm if X.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        M = X @ X.mT
        X = fma(X, fma(M, M, M, beta=b, alpha=c), X, beta=a)
    return (X if wide else X.mT).to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser, two rules: groups with `muon=True` (hidden 2-D weights) take Muon with Nesterov
    momentum; the others take AdamW. One optimiser, so checkpoints, LR schedules and
    torch.distributed.checkpoint treat it like any other."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: str = "float32"):
        # ns_dtype lives in the param groups, so a resumed run reads it back from the checkpoint
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        # Same-shape matrices (q/k/v/o; gate/up; down) are orthogonalised below as one batched stack: a
        # few (N, A, B) matmuls instead of one small matmul per weight, the cost that dominates a small
        # model's step on CPU. Tall matrices are transposed first (UVᵀ of Gᵀ is (UVᵀ)ᵀ).
        stacks = {}  # (ns dtype, ns steps, wide shape) -> [(param, wide Nesterov update, lr, tall)]
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.mul_(1 - lr * wd)  # decoupled weight decay (both rules)
                if group["muon"]:
                    buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    upd = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    tall = p.size(0) > p.size(1)
                    upd = upd.T if tall else upd
                    key = (group.get("ns_dtype", "float32"), group["ns_steps"], tuple(upd.shape))
                    stacks.setdefault(key, []).append((p, upd, lr, tall))
                else:
                    b1, b2 = group["betas"]
                    if not st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    st["step"] += 1
                    t = float(st["step"])
                    st["exp_avg"].lerp_(p.grad, 1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                    p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))
        for (ns_dtype, ns_steps, _), items in stacks.items():
            O = newton_schulz(torch.stack([u for _, u, _, _ in items]), ns_steps, dtype=getattr(torch, ns_dtype))
            for (p, _, lr, tall), o in zip(items, O):
                p.add_(o.T if tall else o, alpha=-lr * 0.2 * max(p.shape) ** 0.5)
        return loss


def build_muon(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
               momentum: float = 0.95, ns_dtype: str | None = None) -> MuonAdamW:
    """Muon for the 2-D weights inside the transformer blocks; AdamW (with `param_groups`' decay rule)
    for embeddings, the output head, gains and biases. Newton–Schulz runs in bfloat16 where bf16
    matmuls are fast (CUDA; CPUs with AMX / AVX512-BF16), else in float32 (ns_dtype=None: decide)."""
    if ns_dtype is None:
        on_cuda = any(p.is_cuda for p in model.parameters())
        ns_dtype = "bfloat16" if on_cuda or cpu_has_fast_bf16() else "float32"
    muon, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if p.dim() == 2 and ".layers." in f".{name}" else other).append(p)
    muon_ids = {id(p) for p in muon}
    adam_groups = []
    for g in param_groups(model, weight_decay):
        g = {**g, "params": [p for p in g["params"] if id(p) not in muon_ids]}
        if g["params"]:
            adam_groups.append(g)
    return MuonAdamW([{"params": muon, "weight_decay": weight_decay, "muon": True}, *adam_groups], lr=lr,
                     betas=betas, eps=eps, momentum=momentum, ns_dtype=ns_dtype)


OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}  # optim.name -> builder(model, lr, wd, betas, eps)
