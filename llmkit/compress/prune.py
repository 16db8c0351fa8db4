"""Pruning a Transformer: unstructured (magnitude, Wanda) and structured (MLP channels, heads, layers).

    model, report = prune(model, "wanda", 0.5, calibration=ids)             # ids (N, T) token ids
    model, report = prune(model, "structured", 0.3, target="mlp", calibration=ids)   # a smaller model

What is pruned: the linear layers inside the blocks (q/k/v/o, gate/up/down, MoE experts), "the prunable
weights". Embeddings, lm_head, norms and MoE routers stay dense, as in Wanda and SparseGPT.

Unstructured methods zero weights in place (W ← M ⊙ W). Tensors keep their shapes: the checkpoint is as
large and dense decode as fast as before; what they show is how much quality survives at a sparsity that
sparse kernels could exploit. The count of zeros is exact:
  magnitude, scope=layer   in each matrix the round(s·numel) smallest |W_ij| are zeroed
  magnitude, scope=global  the round(s·N) smallest |W_ij| over all N prunable weights (layers end uneven)
  wanda                    S_ij = |W_ij| · ‖X_j‖₂, ‖X_j‖₂ the norm of input feature j over the calibration
                           tokens; in each output row i the round(s·in) lowest S_ij are zeroed (Sun et al.
                           2023, "A Simple and Effective Pruning Approach for LLMs", eq. 1, per-output
                           comparison groups). Blocks are pruned in order, each calibrated on the outputs of
                           the already-pruned blocks before it, as the paper's code does.

Structured pruning removes whole units and builds a smaller model (a new ModelConfig; the kept rows and
columns copied), so parameters, memory and decode time really shrink. A unit's importance is the size of
what it adds to the residual stream over the calibration tokens, ‖X_u W_uᵀ‖_F (X_u (N, d_u) its inputs,
W_u (C, d_u) its columns of the output projection):
  mlp     channel j (row j of gate/up, column j of down): ‖x_j‖₂ · ‖W_down[:, j]‖₂ (rank one, so exact)
  heads   query head h (its D rows of q_proj, D columns of o_proj): ‖X_h W_o,hᵀ‖_F. Query heads are removed
          within each KV group, the same number in every group, so n_head stays a multiple of n_kv_head and
          the K/V projections and the KV cache are unchanged (whole KV groups are never removed).
  layers  the contiguous run of n blocks whose input x_l and output x_{l+n} are closest in angular
          distance arccos(cos(x_l, x_{l+n}))/π, averaged over tokens (Gromov et al. 2024, "The
          Unreasonable Ineffectiveness of the Deeper Layers", eq. 7; they use the last token only).
ModelConfig has one d_ff and one n_head for every layer, so every layer keeps the same count of channels
(heads), each layer choosing its own by importance. `sparsity` is the fraction of units removed
(round(s·n)); the report gives the fraction of prunable weights that went with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import LLMKitError, closest
from ..models import ModelConfig, Transformer


# ---------------------------------------------------------------- the prunable weights
def prunable_linears(model: Transformer) -> dict[str, nn.Linear]:
    """The plain linears inside the blocks, by name (MoE routers excluded). A block holding swapped
    projections (quantized, LoRA-wrapped, fused) is refused: prune the plain model first."""
    out = {}
    for name, m in model.layers.named_modules(prefix="layers"):
        if name.endswith("_proj") and type(m) is not nn.Linear:
            raise LLMKitError(f"{name} is a {type(m).__name__}, not a plain linear: prune the unquantized "
                              "model without adapters, then quantize or train adapters")
        if type(m) is nn.Linear and not name.endswith("mlp.gate"):
            out[name] = m
    if not out:
        raise LLMKitError("the model has no linear layers to prune")
    return out


def n_params(model: nn.Module) -> int:
    """Distinct parameters (a tied lm_head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def sparsity_of(model: Transformer) -> float:
    """Fraction of the prunable weights that are exactly zero."""
    ws = [m.weight for m in prunable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def n_removed(s: float, n: int) -> int:
    """Units removed out of n at sparsity s: the nearest integer to s·n (halves round up)."""
    return math.floor(s * n + 0.5)


def check_sparsity(s: float) -> float:
    if not (isinstance(s, (int, float)) and 0 <= s < 1):
        raise LLMKitError(f"sparsity {s} is outside [0, 1)")
    return float(s)


# ---------------------------------------------------------------- calibration
def calibration_ids(tokenizer, text: str, n_seq: int = 32, seq_len: int = 256, source: str = "calibration text"
                    ) -> torch.Tensor:
    """(N, T) token ids: the first N·T tokens of `text` cut into N rows of T (N <= n_seq; a text shorter
    than one row gives one row of all its tokens)."""
    if not text or not text.strip():
        raise LLMKitError(f"{source} is empty: pruning needs calibration text")
    if n_seq < 1 or seq_len < 2:
        raise LLMKitError(f"calibration needs at least 1 sequence of 2 tokens, got {n_seq} x {seq_len}")
    ids = tokenizer.encode(text[: n_seq * seq_len * 16])  # ~16 chars a token is far more than needed
    if len(ids) < 2:
        raise LLMKitError(f"{source} is a single token: pruning needs calibration text")
    n = min(n_seq, len(ids) // seq_len)
    if n == 0:
        return torch.tensor(ids, dtype=torch.long)[None]
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def default_calibration_text() -> str:
    """The training part of the packaged tinyshakespeare (its first 90%; the speedrun holds out the rest)."""
    from importlib.resources import files

    from ..recipes.speedrun import split_bytes

    return split_bytes((files("llmkit.data") / "tinyshakespeare.txt").read_bytes(), 0.1)[0]


class _Stop(Exception):
    pass


@torch.no_grad()
def _block_inputs(model: Transformer, ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], tuple]:
    """The first block's inputs for the calibration rows, in chunks of `batch` rows, and the other
    arguments every block gets (rope, mask, ...): the forward is stopped at block 0."""
    if ids.size(1) > model.max_tokens:
        ids = ids[:, : model.max_tokens]
    xs, extra = [], []

    def catch(module, args):
        xs.append(args[0])
        extra[:] = args[1:]
        raise _Stop

    h = model.layers[0].register_forward_pre_hook(catch)
    device = next(model.parameters()).device
    try:
        for chunk in ids.split(batch):
            try:
                model(chunk.to(device), return_hidden=True)
            except _Stop:
                pass
    finally:
        h.remove()
    return xs, tuple(extra)


@torch.no_grad()
def _collect(block: nn.Module, xs: list[torch.Tensor], extra: tuple, modules: dict[str, nn.Module],
             fn: Callable[[str, nn.Module, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the block on every chunk with a pre-hook on each of `modules` summing fn(name, module, x)
    over chunks, x (N, in) the module's inputs flattened over batch and time."""
    acc: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(module, args):
            x = args[0].detach().reshape(-1, args[0].size(-1)).double()
            v = fn(name, module, x)
            acc[name] = v if name not in acc else acc[name] + v
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for x in xs:
            block(x, *extra)
    finally:
        for h in handles:
            h.remove()
    return acc


def _input_sumsq(name, module, x):  # (in,) Σ_tokens x_j²
    return x.pow(2).sum(0)


@torch.no_grad()
def _blockwise(model: Transformer, ids: torch.Tensor, batch: int,
               visit: Callable[[int, nn.Module, list[torch.Tensor], tuple], None]) -> list[torch.Tensor]:
    """Feed the calibration rows through the blocks one at a time: visit(i, block, xs, extra) sees block i's
    inputs xs (chunks (b, T, C)) first and may collect statistics and change the block; then xs becomes
    the block's outputs (of the changed block). Returns the last block's outputs."""
    xs, extra = _block_inputs(model, ids, batch)
    for i, block in enumerate(model.layers):
        visit(i, block, xs, extra)
        xs = [block(x, *extra) for x in xs]
    return xs


# ---------------------------------------------------------------- unstructured
@torch.no_grad()
def _zero_lowest(w: torch.Tensor, score: torch.Tensor, k: int, dim: int | None) -> None:
    """Zero the k lowest-scoring entries of w: over the whole matrix (dim None) or in each row (dim=1)."""
    if k == 0:
        return
    if dim is None:
        idx = score.flatten().topk(k, largest=False).indices
        w.view(-1)[idx] = 0
    else:
        idx = score.topk(k, dim=dim, largest=False).indices
        w.scatter_(dim, idx, 0)


@torch.no_grad()
def magnitude_prune(model: Transformer, sparsity: float, scope: str = "layer") -> dict:
    """Zero the smallest-|W| prunable weights: round(s·numel) in each matrix (scope=layer) or round(s·N)
    over all of them (scope=global, Han et al. 2015)."""
    linears = prunable_linears(model)
    if scope == "layer":
        for m in linears.values():
            _zero_lowest(m.weight, m.weight.abs(), n_removed(sparsity, m.weight.numel()), None)
        return {"scope": scope}
    if scope != "global":
        raise LLMKitError(f"unknown magnitude scope {scope!r}{closest(scope, SCOPES)}; known: {', '.join(SCOPES)}")
    ws = [m.weight for m in linears.values()]
    k = n_removed(sparsity, sum(w.numel() for w in ws))
    if k == 0:
        return {"scope": scope}
    allabs = torch.cat([w.detach().abs().flatten().float() for w in ws])
    t = allabs.kthvalue(k).values  # the k-th smallest |W|: everything below goes, ties at t as needed
    del allabs
    ties = k - sum(int((w.abs().float() < t).sum()) for w in ws)
    for w in ws:
        a = w.abs().float()
        tie = (a == t).flatten().nonzero().flatten()[:ties]
        ties -= tie.numel()
        w[a < t] = 0
        w.view(-1)[tie] = 0
    return {"scope": scope}


SCOPES = ("layer", "global")


@torch.no_grad()
def wanda_prune(model: Transformer, sparsity: float, calibration: torch.Tensor, batch: int = 8) -> dict:
    """Wanda (Sun et al. 2023): in each output row zero the round(s·in) weights with the lowest
    |W_ij|·‖X_j‖₂, block by block on the activations of the already-pruned blocks."""
    names = {id(m): n for n, m in prunable_linears(model).items()}

    def visit(i, block, xs, extra):
        mods = {names[id(m)]: m for m in block.modules() if id(m) in names}
        sumsq = _collect(block, xs, extra, mods, _input_sumsq)
        for name, m in mods.items():
            if name not in sumsq:  # an MoE expert no calibration token was routed to: |W| alone
                sumsq[name] = torch.ones(m.in_features, dtype=torch.float64)
            w = m.weight
            score = w.abs() * sumsq[name].sqrt().to(w.device, w.dtype)[None]  # (out, in)
            _zero_lowest(w, score, n_removed(sparsity, m.in_features), 1)

    _blockwise(model, calibration, batch, visit)
    return {"calibration_tokens": calibration.numel()}


# ---------------------------------------------------------------- structured
def _rebuild(model: Transformer, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Transformer:
    """A new model of config `cfg` holding the state dict `sd` (same dtype and device as `model`)."""
    w = model.embed_tokens.weight
    new = Transformer(cfg).to(device=w.device, dtype=w.dtype)
    new.load_state_dict(sd, strict=True)
    return new.train(model.training)


def _mlp_importance(model, calibration, batch) -> list[torch.Tensor]:
    """Per layer (d_ff,): ‖x_j‖₂ · ‖W_down[:, j]‖₂, x the down projection's inputs."""
    out = []

    def visit(i, block, xs, extra):
        down = block.mlp.down_proj
        sumsq = _collect(block, xs, extra, {"down": down}, _input_sumsq)["down"]
        out.append(sumsq.sqrt() * down.weight.double().norm(dim=0).cpu())

    _blockwise(model, calibration, batch, visit)
    return out


def _prune_mlp(model: Transformer, sparsity: float, calibration: torch.Tensor, batch: int) -> tuple:
    cfg = model.cfg
    if cfg.n_expert:
        raise LLMKitError("structured MLP pruning of Mixture-of-Experts models is not supported")
    F = cfg.d_ff
    keep = F - n_removed(sparsity, F)
    if keep < 1:
        raise LLMKitError(f"sparsity {sparsity} would remove all {F} MLP channels of every layer")
    scores = _mlp_importance(model, calibration, batch)
    sd = model.state_dict()
    for i, s in enumerate(scores):
        kept = s.topk(keep).indices.sort().values  # the channels' order kept
        for key in [k for k in sd if k.startswith(f"layers.{i}.mlp.")]:
            t = sd[key]
            if ".down_proj." in key:  # (C, F) weight: columns; its bias (C,) stays
                sd[key] = t[:, kept] if key.endswith("weight") else t
            else:  # gate/up (F, C) rows and their (F,) biases
                sd[key] = t[kept]
    return ModelConfig.from_dict({**cfg.to_dict(), "d_ff": keep}), sd, {"d_ff": [F, keep]}


def _head_importance(model, calibration, batch) -> list[torch.Tensor]:
    """Per layer (H,): ‖X_h W_o,hᵀ‖_F, head h's share of the attention output over the calibration tokens."""
    H, D = model.cfg.n_head, model.cfg.head_dim
    out = []

    def contribution(name, o_proj, x):  # x (N, H·D) -> (H,)
        w = o_proj.weight.double()  # (C, H·D)
        return torch.stack([(x[:, h * D:(h + 1) * D] @ w[:, h * D:(h + 1) * D].T).pow(2).sum()
                            for h in range(H)]).sqrt()

    def visit(i, block, xs, extra):
        # the norm of a sum over chunks is not the sum of norms: accumulate squares, root at the end
        sq = _collect(block, xs, extra, {"o": block.self_attn.o_proj},
                      lambda n, m, x: contribution(n, m, x).pow(2))["o"]
        out.append(sq.sqrt().cpu())

    _blockwise(model, calibration, batch, visit)
    return out


def _prune_heads(model: Transformer, sparsity: float, calibration: torch.Tensor, batch: int) -> tuple:
    cfg = model.cfg
    if cfg.attention != "gqa":
        raise LLMKitError(f"structured head pruning supports the gqa attention, not {cfg.attention!r}")
    if cfg.family == "gpt2":
        raise LLMKitError("structured head pruning of GPT-2 models is not supported (its HF config has no head_dim)")
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    g = H // K  # query heads per KV group
    keep = g - n_removed(sparsity, g)
    if keep < 1:
        raise LLMKitError(f"sparsity {sparsity} would remove all {g} query heads of every KV group "
                          f"(n_head={H}, n_kv_head={K})")
    scores = _head_importance(model, calibration, batch)
    sd = model.state_dict()
    for i, s in enumerate(scores):
        heads = torch.cat([grp * g + s[grp * g:(grp + 1) * g].topk(keep).indices.sort().values for grp in range(K)])
        cols = (heads[:, None] * D + torch.arange(D)).flatten()  # the kept heads' D rows of q / columns of o
        p = f"layers.{i}.self_attn."
        sd[p + "q_proj.weight"] = sd[p + "q_proj.weight"][cols]
        if p + "q_proj.bias" in sd:
            sd[p + "q_proj.bias"] = sd[p + "q_proj.bias"][cols]
        sd[p + "o_proj.weight"] = sd[p + "o_proj.weight"][:, cols]
    new = {**cfg.to_dict(), "n_head": K * keep, "head_dim": D}
    return ModelConfig.from_dict(new), sd, {"n_head": [H, K * keep], "n_kv_head": K}


def angular_distances(model: Transformer, calibration: torch.Tensor, n: int, batch: int = 8) -> torch.Tensor:
    """(L - n + 1,): d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n}))/π averaged over the calibration tokens,
    x_l the input of block l (x_L the last block's output) (Gromov et al. 2024)."""
    states: list[list[torch.Tensor]] = []
    last = _blockwise(model, calibration, batch, lambda i, block, xs, extra: states.append(xs))
    states.append(last)
    d = []
    for l in range(len(states) - n):
        a, b = torch.cat([x.flatten(0, 1) for x in states[l]]), torch.cat([x.flatten(0, 1) for x in states[l + n]])
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
        d.append(float(cos.acos().mean() / math.pi))
    return torch.tensor(d)


def _prune_layers(model: Transformer, sparsity: float, calibration: torch.Tensor, batch: int) -> tuple:
    cfg = model.cfg
    L = cfg.n_layer
    n = n_removed(sparsity, L)
    if n >= L:
        raise LLMKitError(f"sparsity {sparsity} would remove all {L} layers")
    d = angular_distances(model, calibration, n, batch) if n else torch.zeros(1)
    start = int(d.argmin())
    gone = set(range(start, start + n))
    kept = [i for i in range(L) if i not in gone]
    sd = {}
    for key, t in model.state_dict().items():
        if key.startswith("layers."):
            i, rest = key[len("layers."):].split(".", 1)
            if int(i) in gone:
                continue
            key = f"layers.{kept.index(int(i))}.{rest}"
        sd[key] = t
    info = {"n_layer": [L, L - n], "removed_layers": sorted(gone), "angular_distance": float(d[start])}
    return ModelConfig.from_dict({**cfg.to_dict(), "n_layer": L - n}), sd, info


TARGETS: dict[str, Callable] = {"mlp": _prune_mlp, "heads": _prune_heads, "layers": _prune_layers}


@torch.no_grad()
def structured_prune(model: Transformer, sparsity: float, target: str, calibration: torch.Tensor,
                     batch: int = 8) -> tuple[Transformer, dict]:
    """-> (a new, smaller model, details): `target` in TARGETS, `sparsity` the fraction of its units removed."""
    if target not in TARGETS:
        raise LLMKitError(f"unknown structured target {target!r}{closest(target, TARGETS)}; "
                          f"known: {', '.join(TARGETS)}")
    if model.prefix is not None:
        raise LLMKitError("the model carries a learned prefix: prune the base model, then train the prefix")
    cfg, sd, info = TARGETS[target](model, sparsity, calibration, batch)
    return _rebuild(model, cfg, sd), {"target": target, **info}


# ---------------------------------------------------------------- the methods
@dataclass(frozen=True)
class PruneMethod:
    name: str
    needs_calibration: bool
    # (model, sparsity, calibration (N, T) | None, options) -> (model, details); may change model in place
    apply: Callable[..., tuple[Transformer, dict]]
    structured: bool = False


def _magnitude(model, s, calibration, scope="layer", **_):
    return model, magnitude_prune(model, s, scope)


def _wanda(model, s, calibration, batch=8, **_):
    return model, wanda_prune(model, s, calibration, batch)


def _structured(model, s, calibration, target="mlp", batch=8, **_):
    return structured_prune(model, s, target, calibration, batch)


METHODS: dict[str, PruneMethod] = {
    "magnitude": PruneMethod("magnitude", False, _magnitude),
    "wanda": PruneMethod("wanda", True, _wanda),
    "structured": PruneMethod("structured", True, _structured, structured=True),
}


def get_method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise LLMKitError(f"unknown pruning method {name!r}{closest(name, METHODS)}; known: {', '.join(METHODS)}")
    return METHODS[name]


def check_options(method: str, sparsity: float, scope: str = "layer", target: str = "mlp") -> PruneMethod:
    """Every option checked before any work (a one-line LLMKitError naming the bad value) -> the method."""
    rec = get_method(method)
    check_sparsity(sparsity)
    if method == "magnitude" and scope not in SCOPES:
        raise LLMKitError(f"unknown magnitude scope {scope!r}{closest(scope, SCOPES)}; known: {', '.join(SCOPES)}")
    if rec.structured and target not in TARGETS:
        raise LLMKitError(f"unknown structured target {target!r}{closest(target, TARGETS)}; "
                          f"known: {', '.join(TARGETS)}")
    return rec


def prune(model: Transformer, method: str, sparsity: float, calibration: torch.Tensor | None = None,
          scope: str = "layer", target: str = "mlp", batch: int = 8) -> tuple[Transformer, dict]:
    """Prune `model` -> (the pruned model, a report). Unstructured methods change `model` in place and
    return it; structured ones return a new, smaller model. scope: magnitude's layer | global; target:
    structured's mlp | heads | layers; batch: calibration rows per forward."""
    rec = check_options(method, sparsity, scope, target)
    if rec.needs_calibration and (calibration is None or calibration.numel() < 2):
        raise LLMKitError(f"{method} pruning needs calibration token ids")
    before, prunable = n_params(model), sum(m.weight.numel() for m in prunable_linears(model).values())
    was_training = model.training
    model.eval()
    new, details = rec.apply(model, float(sparsity), calibration, scope=scope, target=target, batch=batch)
    new.train(was_training)
    after, prunable_after = n_params(new), sum(m.weight.numel() for m in prunable_linears(new).values())
    if rec.structured:  # the prunable weights that went with the removed units
        achieved = 1 - prunable_after / prunable
    else:
        achieved = sparsity_of(new)
    report = {"method": method, "sparsity": sparsity, **details, "params_before": before, "params_after": after,
              "prunable_weights": prunable, "achieved_sparsity": achieved}
    return new, report



# ---------------------------------------------------------------- recovery
def recover(model: Transformer, ids: torch.Tensor, steps: int, lr: float = 1e-3, r: int = 8, batch: int = 4,
            seed: int = 0, progress: bool = False) -> dict:
    """A short recovery fine-tune: LoRA (Hu et al. 2021, rank r on every prunable linear) trained with the
    next-token loss on rows of `ids` (N, T) for `steps` steps of `batch` rows (AdamW, constant lr, the shared
    `train_step`), then merged into the weights. The merged low-rank update is dense, so the zeros an
    unstructured pruning made are put back after the merge: the sparsity is unchanged. -> {"loss_first",
    "loss_last"} (training loss, mean of the first / last 10% of the steps)."""
    from ..losses import cross_entropy
    from ..peft.lora import apply_lora, unload_lora
    from ..progress import progress_bar
    from ..train.loop import train_step

    if steps <= 0:
        raise LLMKitError(f"recovery steps must be positive, got {steps}")
    if ids.size(1) < 2:
        raise LLMKitError("recovery needs calibration rows of at least 2 tokens")
    linears = prunable_linears(model)
    masks = {n: m.weight != 0 for n, m in linears.items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    model.train()
    apply_lora(model, targets=list(linears), r=r, alpha=2.0 * r)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(m, b):  # b["ids"] (B, T): predict tokens 1..T-1 from 0..T-2
        loss = cross_entropy(m(b["ids"][:, :-1]), b["ids"][:, 1:])
        return loss, {"loss": loss.detach()}

    losses = []
    for _ in progress_bar(iterable=range(steps), desc="recover", unit="step", enabled=progress):
        rows = ids[torch.randint(0, ids.size(0), (min(batch, ids.size(0)),), generator=gen)].to(device)
        losses.append(train_step(model, opt, [{"ids": rows}], loss_fn=loss_fn)["loss"])
    unload_lora(model, merge=True)
    with torch.no_grad():
        for n, m in prunable_linears(model).items():
            m.weight.mul_(masks[n])
    for n, p in model.named_parameters():
        p.requires_grad_(grads.get(n, True))
    model.eval()
    k = max(1, steps // 10)
    return {"steps": steps, "lr": lr, "lora_r": r, "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
