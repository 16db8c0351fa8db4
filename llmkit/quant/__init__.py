"""Weight quantization as a quantized state dict plus a module swap (as gpt-fast does it).

    quantize(model, "int4")        # swap every nn.Linear for a QuantLinear in place; nothing else
    fuse_projections(model)        # separate step: q/k/v and gate/up as one matmul (plain, quantized or LoRA)
    model.state_dict()             # the quantized tensors in a portable layout: what a checkpoint holds
    swap_empty(meta_model, layers) # empty QuantLinears on the meta device, then load that state dict
                                   # with assign=True: a quantized checkpoint never passes through fp32

Each method is one `QuantMethod` record in `METHODS` (methods.py): how to quantize an (N, K) weight,
the tensors it stores, how to dequantize them, an optional fast kernel for few-row inputs and how
row blocks concatenate when projections are fused. `QuantLinear` is the one module for all of them;
it holds only the quantized tensors (no full-precision copy):

  * few rows (decode, speculative verification) with a kernel: torch's weight-only kernel on bf16
    activations, or on x86 CPUs with AVX2 and no AVX-512 llmkit's own C loops (native.py);
  * many rows (prefill) or no kernel: the weight dequantized for this call only, then one GEMM in the
    method's dense dtype (for int8/int4 bf16 where the CPU has AMX/AVX512-bf16, ~5x fp32 at 128 rows;
    fp32 elsewhere); prefill GEMMs
    take about 1.8x (int8) to 4.6x (int4) as long as with a kept bf16 copy, which `keep_dense_copy`
    opts into;
  * input that needs a gradient (LoRA, adapters, prompt tuning on a quantized base): a custom
    autograd function that dequantizes again in backward instead of saving the (N, K) weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LLMKitError
from .methods import GROUP, METHODS, QuantMethod, get_method

__all__ = ["QuantLinear", "QuantEmbedding", "QuantMethod", "METHODS", "GROUP", "SMALL_M", "get_method", "quantize", "fuse_projections",
           "quantized_layers", "swap_empty", "keep_dense_copy", "plan"]

# Inputs of at most this many rows use a method's weight-only kernel: decode of one sequence (1 row) or
# of a batch of sequences together (M rows, the server's scheduler), and prefills. Measured per SmolLM2 block
# (benchmarks/matmul_bandwidth.py, BENCHMARKS.md): the int4 kernel's time grows ~linearly with M and meets
# a kept bf16 copy's GEMM at M = 8-12, so with a copy the GEMM takes over above 8 rows. Without a copy the
# alternative is dequantizing every weight per call and a bf16 GEMM: a block's four int4 matrices took
# 1.5 / 2.9 / 6.0 / 11.7 ms at 64 / 128 / 256 / 512 rows against 10.7 / 11.1 / 11.8 / 14.6 ms dequantized
# (`python benchmarks/matmul_bandwidth.py --threads 2 --rounds 10 --rows 1,4,8,16,64,128,256,512`, AMD EPYC,
# no AMX), so the kernel keeps going to 256 rows (a 128-token prompt's prefill: 575 -> 995 tok/s in `llmkit
# bench decode`); a longer forward is dequantized once a call.
SMALL_M = 8
SMALL_M_NO_COPY = 256


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ with W dequantized on the fly; backward gives dx = dy W only (W is frozen), dequantizing
    again rather than keeping the (N, K) weight alive between forward and backward (as QLoRA does)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        return gy @ ctx.module.dequantize(gy.dtype), None


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored by `method` (a METHODS name or a QuantMethod). x: (..., K) -> (..., N),
    in x's dtype. `tensors` are in the method's storage layout (state-dict layout); None makes empty
    ones of the right shapes on `device` (the meta device, to load a checkpoint into)."""

    def __init__(self, method, in_features: int, out_features: int, bias: bool = False,
                 tensors: dict[str, torch.Tensor] | None = None, bias_tensor: torch.Tensor | None = None,
                 device=None):
        super().__init__()
        self.method = method if isinstance(method, QuantMethod) else get_method(method)
        self.in_features, self.out_features = in_features, out_features
        if not self.method.accepts(out_features, in_features):
            raise LLMKitError(f"{self.method.name} does not take a {out_features}x{in_features} weight "
                              f"({self.method.shape_rule})")
        shapes = self.method.shapes(out_features, in_features)
        if tensors is None:
            tensors = {k: torch.empty(s, dtype=dt, device=device) for k, (s, dt) in shapes.items()}
        self._set(tensors, shapes)
        if bias and bias_tensor is None:
            bias_tensor = torch.empty(out_features, device=device)
        self.register_buffer("bias", None if bias_tensor is None else bias_tensor.detach().float())
        self.dense: torch.Tensor | None = None  # opt-in dequantized copy for prefill (`keep_dense_copy`)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method, act: torch.Tensor | None = None) -> QuantLinear:
        """`act` (K,): calibration activation absmax per input feature, for calibrated methods."""
        rec = method if isinstance(method, QuantMethod) else get_method(method)
        N, K = linear.weight.shape
        if not rec.accepts(N, K):
            raise LLMKitError(f"{rec.name} does not take a {N}x{K} weight ({rec.shape_rule})")
        w = linear.weight.detach().float()
        if rec.calibrated and act is None:
            raise LLMKitError(f"{rec.name} needs calibration activations (llmkit quantize --calibration FILE)")
        tensors = rec.quantize(w, act.float()) if rec.calibrated else rec.quantize(w)
        return cls(rec, K, N, tensors=tensors, bias_tensor=linear.bias).train(linear.training)

    def _set(self, storage: dict[str, torch.Tensor], shapes) -> None:
        for k, (s, dt) in shapes.items():
            t = storage[k]
            if tuple(t.shape) != tuple(s):
                raise LLMKitError(f"{self.method.name} tensor {k!r} has shape {tuple(t.shape)}, "
                                  f"a {self.out_features}x{self.in_features} weight needs {tuple(s)}")
        self._names = tuple(shapes)  # the tensors' names, for `tensors()` (each forward) without rebuilding shapes
        for k, v in self.method.to_runtime(storage, self.out_features, self.in_features).items():
            if v.device.type == "cpu" and v.data_ptr() % 64:
                # tensors read from a safetensors file can sit at any offset, and the int8/int4 kernels
                # crash on unaligned rows (seen: int8 lm_head at an 8-byte offset): realign with a copy
                v = v.clone()
            self.register_buffer(k, v)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The quantized tensors in the runtime layout (what the kernels take)."""
        b = self._buffers  # read directly: every forward asks (nn.Module.__getattr__ is the slow path)
        return {k: b[k] for k in self._names}

    def storage(self) -> dict[str, torch.Tensor]:
        """The quantized tensors in the portable storage layout (what the state dict holds)."""
        return self.method.from_runtime(self.tensors(), self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight in `dtype`, materialised only for the caller."""
        return self.method.dequantize(self.tensors(), self.out_features, self.in_features, dtype)

    @property
    def n_quantized_params(self) -> int:
        """Parameters the quantized tensors stand for (for memory and trainable-share reports)."""
        return self.out_features * self.in_features + (0 if self.bias is None else self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.requires_grad and torch.is_grad_enabled():
            y = _DequantLinear.apply(x, self)
        elif rows <= self._kernel_rows() and self.method.matmul is not None and x.device.type == "cpu":
            y = self.method.matmul(x.reshape(rows, -1), self.tensors(), self.out_features)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            dt = self.method.dense_dtype or x.dtype
            w = self.dense if self.dense is not None and self.dense.dtype == dt else self.dequantize(dt)
            y = F.linear(x if x.dtype == dt else x.to(dt), w)
        if y.dtype != x.dtype:  # (a no-op .to() is still a dispatch: 2 per layer in a decode step)
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _kernel_rows(self) -> int:
        """Most rows the method's kernel takes: SMALL_M beside a kept dense copy, else the method's own
        limit where it has one (llmkit's AVX2 int4 loop), else SMALL_M_NO_COPY."""
        if self.dense is not None:
            return SMALL_M
        own = self.method.kernel_rows() if self.method.kernel_rows is not None else None
        return SMALL_M_NO_COPY if own is None else own

    @classmethod
    def concat(cls, parts: list[QuantLinear]) -> QuantLinear | None:
        """One QuantLinear whose output is cat([p(x) for p in parts], -1), by concatenating the parts'
        quantized rows (exact for int8 and int4; see each method's `concat`). None if not possible."""
        rec = parts[0].method
        K = parts[0].in_features
        if any(p.method is not rec or p.in_features != K for p in parts) or rec.concat is None:
            return None
        biases = [p.bias for p in parts]
        if any((b is None) != (biases[0] is None) for b in biases):
            return None
        N = sum(p.out_features for p in parts)
        fused = cls(rec, K, N, bias=biases[0] is not None, device="meta")
        for k, v in rec.concat([p.tensors() for p in parts], [p.out_features for p in parts], K).items():
            fused.register_buffer(k, v)
        if biases[0] is not None:
            fused.register_buffer("bias", torch.cat(biases))
        return fused.train(parts[0].training)

    # ---- state dict: the storage layout, whatever the runtime layout is
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in self.storage().items():
            destination[prefix + k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shapes = self.method.shapes(self.out_features, self.in_features)
        keys = list(shapes) + ([] if self.bias is None else ["bias"])
        missing = [prefix + k for k in keys if prefix + k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        try:
            self._set({k: state_dict[prefix + k] for k in shapes}, shapes)
        except LLMKitError as e:
            error_msgs.append(f"{prefix}: {e}")
            return
        if self.bias is not None:
            self.register_buffer("bias", state_dict[prefix + "bias"].detach().float())
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in keys
                                   and "." not in k[len(prefix):])

    def _apply(self, fn, recurse=True):
        """.to(dtype) must not cast the quantized tensors (the kernels need their own dtypes, e.g. bf16
        int4 scales): moves keep each tensor's dtype, casts touch only the bias."""
        super()._apply(fn, recurse)
        shapes = self.method.shapes(self.out_features, self.in_features)
        for k, (_, dt) in shapes.items():
            t = getattr(self, k)
            if t.dtype != dt:
                self.register_buffer(k, t.to(dt))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method.name}, "
                f"bias={self.bias is not None}")



class QuantEmbedding(nn.Module):
    """Token embedding over a row-quantized (V, C) table (int8: per-row scales): ids (...) -> (..., C),
    gathering and dequantizing only the rows asked for, so the (V, C) table never exists in fp32.

    Tied to a quantized head (`QuantEmbedding.tied(lm_head)`, as a GGUF's token_embd serves both) it
    reads the head's tensors and holds none of its own (its state dict is empty: the head's is the
    table); otherwise it owns them. `weight` dequantizes the whole table for the rare callers that read
    it (prompt-tuning init, pruning); `dtype` is the output dtype, which `.to(dtype)` sets."""

    ROW_METHODS = ("int8",)  # methods whose runtime tensors are per-row: row i is tensors[k][i]

    def __init__(self, method, num_embeddings: int, embedding_dim: int,
                 tensors: dict[str, torch.Tensor] | None = None, device=None):
        super().__init__()
        self.method = method if isinstance(method, QuantMethod) else get_method(method)
        if self.method.name not in self.ROW_METHODS:
            raise LLMKitError(f"a quantized embedding takes {', '.join(self.ROW_METHODS)}, not {self.method.name}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.head: QuantLinear | None = None
        self.out_dtype = torch.float32
        shapes = self.method.shapes(num_embeddings, embedding_dim)
        if tensors is None:
            tensors = {k: torch.empty(s, dtype=dt, device=device) for k, (s, dt) in shapes.items()}
        for k, v in tensors.items():
            self.register_buffer(k, v)

    @classmethod
    def tied(cls, head: QuantLinear) -> QuantEmbedding:
        """The embedding that shares `head`'s quantized (V, C) table (a module reference, not a child:
        the model holds the head once, and moves and saves it as the head)."""
        emb = cls(head.method, head.out_features, head.in_features, tensors={})
        object.__setattr__(emb, "head", head)  # not registered: no second copy in modules()/state_dict()
        return emb

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.head is not None:
            return self.head.tensors()
        return {k: getattr(self, k) for k in self.method.shapes(self.num_embeddings, self.embedding_dim)}

    @property
    def weight(self) -> torch.Tensor:
        return self.method.dequantize(self.tensors(), self.num_embeddings, self.embedding_dim, self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {k: v[flat] for k, v in self.tensors().items()}  # (n, C) codes and (n,) scales
        x = self.method.dequantize(rows, flat.numel(), self.embedding_dim, self.out_dtype)
        return x.view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        """Moves move the codes (keeping their dtypes); a cast sets only the output dtype."""
        super()._apply(fn, recurse)
        for k, (_, dt) in self.method.shapes(self.num_embeddings, self.embedding_dim).items():
            t = getattr(self, k, None)
            if t is not None and t.dtype != dt:
                self.register_buffer(k, t.to(dt))
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, method={self.method.name}"
                + (", tied to the head" if self.head is not None else ""))

def keep_dense_copy(model: nn.Module, keep: bool = True) -> nn.Module:
    """Opt-in faster prefill: each QuantLinear keeps its weight dequantized to the method's dense dtype
    (bf16 for int8/int4) for many-row inputs, instead of dequantizing per call. Costs 2 bytes a weight
    on top of the quantized ones (256 MiB for SmolLM2-135M); not saved in the state dict. Measured on
    SmolLM2-135M, all fused linears at 128 rows (2-core Xeon, 2 threads): int8 50 ms with the copy vs
    91 ms dequantizing per call, int4 52 vs 239 ms (BENCHMARKS.md, benchmarks/quant_memory.py)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.dense = m.dequantize(m.method.dense_dtype or torch.float32) if keep else None
    return model


def _layer_method(rec: QuantMethod, name: str, N: int, K: int) -> QuantMethod | None:
    """The method a linear named `name` gets under `rec`: the head may get another (its errors land on
    the logits directly), and shapes a method's kernel does not take fall back (int4 -> int8 -> none)."""
    is_head = name.rsplit(".", 1)[-1] == "lm_head"
    if is_head and rec.head is None:
        return None
    m = get_method(rec.head) if is_head else rec
    while m is not None and not m.accepts(N, K):
        m = get_method(m.fallback) if m.fallback else None
    return m


def _match(name: str, targets) -> bool:
    """PEFT-style target matching: a full name or a suffix after '.', or 'all-linear' (all but lm_head)."""
    if targets is None:
        return True
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets == ["all-linear"]:
        return name != "lm_head"
    return any(name == t or name.endswith("." + t) for t in targets)


def plan(model: nn.Module, method, targets=None) -> list[tuple[str, nn.Linear, QuantMethod]]:
    """[(name, linear, its method)] for every plain nn.Linear `quantize` swaps (shared with QAT's
    fake-quantization, so both treat the same layers the same way)."""
    rec = method if isinstance(method, QuantMethod) else get_method(method)
    found, out = False, []
    for name, child in list(model.named_modules()):
        if not _match(name, targets) or not isinstance(child, nn.Linear | QuantLinear):
            continue
        found = True
        if type(child) is not nn.Linear:  # already quantized (e.g. a quantized checkpoint): left as it is
            continue
        m = _layer_method(rec, name, *child.weight.shape)
        if m is not None:
            out.append((name, child, m))
    if targets is not None and not found:
        raise LLMKitError(f"no linear layer matches {targets!r}")
    return out


def quantize(model: nn.Module, method="int8", targets=None, calibration=None) -> nn.Module:
    """Swap every plain nn.Linear of `model` (or those matching `targets`) for a QuantLinear, in place;
    returns the model. Does not fuse (`fuse_projections` is its own step). Quantize the base model
    before applying adapters (as QLoRA does): adapters' own linears are plain nn.Linear too.

    The head follows the method's `head` rule (int8 for int8/int4: llama.cpp likewise keeps `output` at
    Q6_K/Q8_0 in its 4-bit files; none for NF4, whose QLoRA keeps it in full precision), shapes a kernel
    does not take fall back (int4 -> int8), and linears no method takes stay as they are.
    `calibration`: {linear name: (K,) activation absmax} (`calibrate.activation_absmax`) or a function
    returning it, called only if a layer's method is calibrated (outlier-aware)."""
    layers = plan(model, method, targets)
    stats = {}
    if any(m.calibrated for _, _, m in layers):  # measured on the model before any layer is swapped
        stats = (calibration() if callable(calibration) else calibration) or {}
    for name, child, m in layers:
        if m.calibrated and name not in stats:
            raise LLMKitError(f"{m.name} needs calibration activations for {name} "
                              "(llmkit quantize --calibration FILE)")
        _set_module(model, name, QuantLinear.from_linear(child, m, stats.get(name)))
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """{module name: method name} of every QuantLinear (what llmkit.json records)."""
    return {n: m.method.name for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}


def swap_empty(model: nn.Module, layers: dict[str, str], device="meta") -> nn.Module:
    """Replace the named nn.Linear modules by empty QuantLinears (on `device`) of the recorded methods, so
    that `model.load_state_dict(quantized_sd, assign=True)` fills them: the gpt-fast loading order."""
    for name, method in layers.items():
        try:
            get_method(method)
        except LLMKitError as e:
            raise LLMKitError(f"checkpoint layer {name}: {e}") from None
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise LLMKitError(f"checkpoint names quantized layer {name!r}, which this model config does not "
                              "have") from None
        if isinstance(lin, nn.Embedding):  # a quantized token table (GGUF token_embd)
            _set_module(model, name, QuantEmbedding(method, lin.num_embeddings, lin.embedding_dim, device=device))
            continue
        if not isinstance(lin, nn.Linear):
            raise LLMKitError(f"checkpoint quantized layer {name!r} is not a linear layer")
        _set_module(model, name, QuantLinear(method, lin.in_features, lin.out_features, lin.bias is not None,
                                             device=device))
    return model


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up (modules with a `fuse()` method) in place: fewer, larger matmuls per decode
    step. Works on plain, quantized and LoRA-wrapped projections (see `models.modules.concat_linears`);
    groups whose parts cannot be concatenated (mixed kinds) stay separate. Returns the model."""
    for m in list(model.modules()):
        if hasattr(m, "fuse"):
            m.fuse()
    return model
