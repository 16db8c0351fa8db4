"""The quantization methods: one `QuantMethod` record each, registered in `METHODS`.

A record says, for a weight W (N, K) (N outputs, K inputs):
  shapes      the tensors it stores {name: (shape, dtype)} (the checkpoint / state-dict layout)
  quantize    W fp32 -> those tensors
  dequantize  runtime tensors -> W (N, K) in a dtype
  matmul      optional weight-only kernel for few rows: x (M, K) -> (M, N) (each kernel casts x to the dtype
              it takes; the caller casts the result back)
  kernel_rows optional () -> the most rows `matmul` should take here, where it is not QuantLinear's default
              (it can depend on the CPU's kernel: a callable, asked at call time)
  concat      stack several weights' runtime tensors along N (fusing q/k/v, gate/up)
  to_runtime / from_runtime  storage <-> the layout the kernel wants (identity unless a kernel's
              layout depends on the CPU, as torch's int4 packing does)
Adding a method (a GGUF K-quant, HQQ, ...) is one more record here. Parametrised families are
records generated from their name (`get_method` parses it): the post-training quantization grid
`int{2,3,4,8}-{sym,asym}-{tensor,channel,b32,b64,b128}`, its outlier-aware variants `...-o{k}` and
NF4 `nf4-b{64,128,256}[-dq]`.

Decoding one token reads every weight once, so its speed is memory bandwidth: int8 reads a quarter
of fp32's bytes, int4 an eighth. Measured on this 2-core Xeon (1 thread, all SmolLM2 matrices once):
fp32 71 ms, int8 39 ms, int4 20 ms.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LLMKitError, closest
from . import native
from .nf4 import nf4_dequantize, nf4_quantize

GROUP = 32  # int4 group size (GGUF Q4_0/Q4_1 blocks)

# dtype of the GEMM when int8/int4 weights are dequantized (many rows): bf16 where the CPU has bf16 dot
# products (AVX512-BF16, AMX: ~5x fp32 at 128 rows), fp32 elsewhere (AVX2 CPUs emulate bf16 GEMMs: 5.8x
# slower than fp32 at 128 rows on an AMD EPYC Zen 3, 54.6 vs 9.4 ms a SmolLM2 block, benchmarks/matmul_bandwidth.py)
DENSE = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else torch.float32

Tensors = dict[str, torch.Tensor]


def _identity(t: Tensors, N: int, K: int) -> Tensors:
    return t


@dataclass(frozen=True)
class QuantMethod:
    name: str
    shape_rule: str  # the shapes `accepts` takes, in words (for error messages)
    accepts: Callable[[int, int], bool]  # (N, K) -> whether this method (its kernel) takes the shape
    shapes: Callable[[int, int], dict]  # (N, K) -> {name: (shape, dtype)} of the stored tensors
    quantize: Callable[[torch.Tensor], Tensors]  # W (N, K) fp32 -> storage tensors
    dequantize: Callable[[Tensors, int, int, torch.dtype], torch.Tensor]  # runtime tensors -> W (N, K)
    concat: Callable[[list[Tensors], list[int], int], Tensors] | None  # runtimes of (N_i, K) -> (sum N_i, K)
    matmul: Callable[[torch.Tensor, Tensors, int], torch.Tensor] | None = None  # x (M, K) -> (M, N)
    kernel_rows: Callable[[], int | None] | None = None  # rows up to which `matmul` beats dequantize + GEMM
    dense_dtype: torch.dtype | None = None  # GEMM dtype of the dequantize path (None: the input's)
    head: str | None = None  # method for lm_head (None: left in full precision)
    fallback: str | None = None  # method for shapes `accepts` refuses (None: left in full precision)
    to_runtime: Callable[[Tensors, int, int], Tensors] = _identity
    from_runtime: Callable[[Tensors, int, int], Tensors] = _identity
    # calibrated: `quantize` takes (W, act) with act (K,) the calibration inputs' absmax per input feature
    calibrated: bool = False

    def roundtrip(self, w: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        """W (N, K) fp32 -> what a QuantLinear of this method computes with: dequantize(quantize(W)),
        fp32. The forward of quantization-aware training (qat.py) and the error the tests bound."""
        N, K = w.shape
        t = self.quantize(w, act) if self.calibrated else self.quantize(w)
        return self.dequantize(self.to_runtime(t, N, K), N, K, torch.float32)


# ---------------------------------------------------------------- int8: per output channel, symmetric
def _int8_quantize(w: torch.Tensor) -> Tensors:
    """w = s * q, q in [-127, 127], s = max|w_row| / 127 (absmax, as LLM.int8 without outliers,
    Dettmers et al. 2022)."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
    return {"qweight": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
            "scales": scale.to(torch.bfloat16)}


INT8 = QuantMethod(
    name="int8", shape_rule="in_features divisible by 16",
    # torch 2.13's int8 pack kernel reads past the row when in_features % 16 != 0
    accepts=lambda N, K: K % 16 == 0,
    shapes=lambda N, K: {"qweight": ((N, K), torch.int8), "scales": ((N,), torch.bfloat16)},
    quantize=_int8_quantize,
    dequantize=lambda t, N, K, dt: t["qweight"].to(dt).mul_(t["scales"].to(dt)[:, None]),  # one (N, K) buffer
    # per-row quantization: rows concatenate exactly
    concat=lambda ts, Ns, K: {k: torch.cat([t[k] for t in ts]) for k in ("qweight", "scales")},
    matmul=lambda x, t, N: (native.int8_mm(x, t["qweight"], t["scales"]) if native.available() else
                            torch._weight_int8pack_mm(x.to(torch.bfloat16), t["qweight"], t["scales"])),
    dense_dtype=DENSE, head="int8")


# ---------------------------------------------------------------- int4: groups of 32, asymmetric
def _int4_quantize(w: torch.Tensor) -> Tensors:
    """w = s * q + m per group of 32 inputs, q in [0, 15], s = (max - min) / 15, m = min: the Q4_1
    layout of GGUF, so a Q4_1 model's weights come back exactly up to bf16 rounding of s and m.
    Stored: qweight (N, K/2) uint8, input 2j in the low nibble and 2j+1 in the high one; scales
    (K/G, N, 2) bf16 holding (s, z) with z = m + 8 s, since torch's kernel computes (q - 8) s + z."""
    N, K = w.shape
    g = w.reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo) / s).clamp(0, 15).to(torch.uint8).reshape(N, K)
    z = lo + 8 * s
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4),
            "scales": torch.stack([s[..., 0].t(), z[..., 0].t()], -1).contiguous().to(torch.bfloat16)}


def _int4_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Portable (N, K/2) nibbles -> (N, K) codes."""
    return torch.stack([qweight & 15, qweight >> 4], -1).reshape(qweight.size(0), -1)


@functools.cache
def _int4_block() -> int:
    """Rows per block of torch's CPU int4 packing: 64 with AVX512, 32 otherwise (int4mm_kernel.cpp).
    Found by packing a small probe and checking which layout unpacks it, so a torch build that chose
    differently fails loudly instead of dequantizing garbage. Cached: a property of this process."""
    probe = (torch.arange(80 * 32, dtype=torch.int32).reshape(80, 32) * 7) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32):
        if torch.equal(_int4_unpack_kernel(packed, 80, 32, block), probe.to(torch.uint8)):
            return block
    raise LLMKitError("this torch build packs int4 weights in a layout llmkit does not know; use int8 or nf4")


def _int4_unpack_kernel(packed: torch.Tensor, N: int, K: int, block: int) -> torch.Tensor:
    """torch's CPU int4 layout (N, K/2) -> (N, K) codes. Rows come in blocks of `block`; inside a block
    the bytes are k-major, byte j of row k holding rows j (low nibble) and j + block/2 (high); a
    shorter last block (16, 32 or 48 rows) pairs rows 2j and 2j + 1 instead."""
    full = N // block * block
    p = packed.reshape(-1)[:full * K // 2].view(N // block, K, block // 2)  # whole blocks in one go
    out = [torch.cat([p & 15, p >> 4], 2).transpose(1, 2).reshape(full, K)]
    if full < N:
        seg = packed.reshape(-1)[full * K // 2:].view(K, (N - full) // 2)
        out.append(torch.stack([seg & 15, seg >> 4], 2).reshape(K, N - full).t())
    return torch.cat(out) if len(out) > 1 else out[0]


# Runtime layouts: where llmkit's kernels run (native.available(): AVX2 CPUs without AVX-512) the storage
# layout itself with the scales transposed to (N, K/G, 2), one row's groups adjacent; elsewhere torch's CPU
# packing (its kernel's layout, which depends on the CPU) with the scales as stored.
def _swap_scale_axes(t: Tensors) -> Tensors:
    """llmkit's int4 layout <-> storage: the scales' (K/G, N) axes swapped, the nibbles as they are."""
    return {"qweight": t["qweight"], "scales": t["scales"].transpose(0, 1).contiguous()}


def _int4_to_runtime(t: Tensors, N: int, K: int) -> Tensors:
    if t["qweight"].device.type == "meta":
        return dict(t)
    if native.available():
        return _swap_scale_axes(t)
    codes = _int4_codes(t["qweight"]).to(torch.int32)
    return {"qweight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), "scales": t["scales"]}


def _int4_from_runtime(t: Tensors, N: int, K: int) -> Tensors:
    if native.available():
        return _swap_scale_axes(t)
    q = _int4_unpack_kernel(t["qweight"], N, K, _int4_block())
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": t["scales"]}


def _int4_dequantize(t: Tensors, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """w = (q - 8) s + z, the kernel's formula, as one fused multiply-add in `dtype`: q - 8, s and z are
    exact in bf16, so the weight is rounded once (as a bf16 copy of the fp32 dequantization would be).
    Not z - 8 s first: that difference rounded to bf16 would shift whole groups."""
    if native.available() and dtype == torch.float32 and not torch.compiler.is_compiling():
        return native.int4_dequantize(t["qweight"], t["scales"], N, K)  # the same formula in C: one pass, no temporaries
    if native.available():
        q, sc = _int4_codes(t["qweight"]), t["scales"].to(dtype)  # sc (N, K/G, 2)
        s, z = sc[..., 0, None], sc[..., 1, None]
    else:
        q, sc = _int4_unpack_kernel(t["qweight"], N, K, _int4_block()), t["scales"].to(dtype)  # sc (K/G, N, 2)
        s, z = sc[..., 0].t()[..., None], sc[..., 1].t()[..., None]  # (N, K/G, 1)
    q = q.view(N, K // GROUP, GROUP).to(dtype).sub_(8)
    return torch.addcmul(z, q, s).reshape(N, K)


# llmkit's int4 loop is bound by its arithmetic from a few rows on (8 rows of int16 x per unpacked weight), so past
# 16 rows the weight dequantized to fp32 in C and a GEMM win (QuantLinear's dense path, through `kernel_rows`).
# One SmolLM2 block (`python benchmarks/matmul_bandwidth.py --threads 2 --rounds 10`, AMD EPYC Zen 3, AVX2):
# loop 0.53 / 1.20 ms at 8 / 16 rows against dequantize + fp32 GEMM 2.08 / 2.81 (stop 34); at 128 rows that GEMM
# path 11.7 against torch's int4 kernel 18.9 (stop 31)
NATIVE_INT4_MAX_ROWS = 16


def _int4_matmul(x: torch.Tensor, t: Tensors, N: int) -> torch.Tensor:
    if native.available():
        return native.int4_mm(x, t["qweight"], t["scales"], N)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), t["qweight"], GROUP, t["scales"])


def _int4_kernel_rows() -> int | None:
    # a compiled graph keeps the loop at any row count (the C dequantization is eager-only)
    return NATIVE_INT4_MAX_ROWS if native.available() and not torch.compiler.is_compiling() else None


def _int4_concat(ts: list[Tensors], Ns: list[int], K: int) -> Tensors:
    """Per-row groups: rows (and the scales' N axis) concatenate exactly. When every part is a whole
    number of the kernel's row blocks (SmolLM2: 576, 192, 1536 rows), the packed blocks concatenate as
    they are; otherwise through the portable codes."""
    if native.available():  # rows and their scales (N, K/G, 2) concatenate as they are
        return {k: torch.cat([t[k] for t in ts]) for k in ("qweight", "scales")}
    scales = torch.cat([t["scales"] for t in ts], 1)
    if all(n % _int4_block() == 0 for n in Ns):
        return {"qweight": torch.cat([t["qweight"] for t in ts]), "scales": scales}
    q = torch.cat([_int4_from_runtime(t, n, K)["qweight"] for t, n in zip(ts, Ns)])
    return _int4_to_runtime({"qweight": q, "scales": scales}, sum(Ns), K)


INT4 = QuantMethod(
    name="int4", shape_rule=f"in_features divisible by {GROUP} and out_features by 16",
    accepts=lambda N, K: K % GROUP == 0 and N % 16 == 0,
    shapes=lambda N, K: {"qweight": ((N, K // 2), torch.uint8), "scales": ((K // GROUP, N, 2), torch.bfloat16)},
    quantize=_int4_quantize, dequantize=_int4_dequantize,
    concat=_int4_concat,
    matmul=_int4_matmul, kernel_rows=_int4_kernel_rows, dense_dtype=DENSE, head="int8", fallback="int8",
    to_runtime=_int4_to_runtime, from_runtime=_int4_from_runtime)



# ---------------------------------------------------------------- bf16: a dense weight in 16 bits
BF16 = QuantMethod(
    # GGUF Q5_x/Q6_K weights load into this (llmkit.checkpoint.gguf): their values d * sc * q need more
    # bits than int4 has and per-channel int8 would re-round them, while bf16 keeps each value to a
    # relative 2^-9, well under a 5/6-bit code's step (2^-4..2^-5 of its block's range)
    name="bf16", shape_rule="any shape", accepts=lambda N, K: True,
    shapes=lambda N, K: {"qweight": ((N, K), torch.bfloat16)},
    quantize=lambda w: {"qweight": w.to(torch.bfloat16)},
    dequantize=lambda t, N, K, dt: t["qweight"].to(dt),
    concat=lambda ts, Ns, K: {"qweight": torch.cat([t["qweight"] for t in ts])},
    matmul=lambda x, t, N: torch.nn.functional.linear(x.to(torch.bfloat16), t["qweight"]),
    head="bf16")  # many rows: the GEMM in the input's dtype (bf16 activations would add their own rounding)

# ---------------------------------------------------------------- NF4 (QLoRA), bitsandbytes-exact
def nf4_method(blocksize: int = 64, double_quant: bool = True) -> QuantMethod:
    """NF4 with double-quantised scales (Dettmers et al. 2023; the math and its bitsandbytes parity test
    live in nf4.py). Registered as "nf4" with bitsandbytes' QLoRA defaults (64, double quant).
    No kernel: every forward dequantizes, as bitsandbytes does on CPU. Fusing re-quantizes the
    concatenated weight: the 4-bit codes come back unchanged where blocks align with the parts
    (N_i K divisible by the block size), the 8-bit double-quantised scales to within their own error."""
    if blocksize <= 0:
        raise LLMKitError(f"NF4 block size must be positive, got {blocksize}")

    def shapes(N, K):
        n, nb = N * K, -(-N * K // blocksize)
        if not double_quant:
            return {"packed": (((n + 1) // 2,), torch.uint8), "absmax": ((nb,), torch.float32)}
        return {"packed": (((n + 1) // 2,), torch.uint8), "absmax_q": ((nb,), torch.uint8),
                "absmax2": ((-(-nb // 256),), torch.float32), "absmax_offset": ((), torch.float32)}

    def dequantize(t, N, K, dtype):
        return nf4_dequantize(t, (N, K), blocksize, dtype)

    def concat(ts, Ns, K):  # runtime layout = storage layout
        return nf4_quantize(torch.cat([dequantize(t, n, K, torch.float32) for t, n in zip(ts, Ns)]),
                            blocksize, double_quant)

    default = blocksize == 64 and double_quant
    return QuantMethod(name="nf4" if default else f"nf4-b{blocksize}{'-dq' if double_quant else ''}",
                       shape_rule="any shape", accepts=lambda N, K: True, shapes=shapes,
                       quantize=lambda w: nf4_quantize(w, blocksize, double_quant), dequantize=dequantize,
                       concat=concat)


# ---------------------------------------------------------------- the PTQ grid: int{2,3,4,8}, sym/asym, granularity
PTQ_BITS = (2, 3, 4, 8)
PTQ_GRAINS = ("tensor", "channel", "b32", "b64", "b128")  # one scale per tensor / output row / block of inputs
NF4_BLOCKS = (64, 128, 256)
_PTQ = re.compile(r"int(\d+)-(sym|asym)-(tensor|channel|b\d+)(?:-o(\d+))?")
_NF4 = re.compile(r"nf4-b(\d+)(-dq)?")
SPEC_HELP = ("int{2,3,4,8}-{sym,asym}-{tensor,channel,b32,b64,b128}[-o{k}] (k outlier input features kept in "
             "fp16, calibrated), nf4-b{64,128,256}[-dq]")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes < 2**bits (K divisible by 8) -> (N, K * bits / 8) uint8: each run of 8 codes fills
    `bits` bytes, code i at bit offset bits * i (little-endian), so 3-bit weights take 3 bits on disk."""
    if bits == 8:
        return codes.to(torch.uint8)
    N, K = codes.shape
    c = codes.to(torch.int64).view(N, K // 8, 8)
    acc = (c << (bits * torch.arange(8))).sum(-1, keepdim=True)  # (N, K/8, 1), < 2**(8 bits)
    return ((acc >> (8 * torch.arange(bits))) & 255).to(torch.uint8).reshape(N, K * bits // 8)


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_bits: (N, K * bits / 8) uint8 -> (N, K) int64 codes."""
    if bits == 8:
        return packed.to(torch.int64)
    N = packed.size(0)
    b = packed.to(torch.int64).view(N, K // 8, bits)
    acc = (b << (8 * torch.arange(bits))).sum(-1, keepdim=True)
    return ((acc >> (bits * torch.arange(8))) & (2**bits - 1)).reshape(N, K)


def _grouped(w: torch.Tensor, grain: str) -> torch.Tensor:
    """(N, K) -> (rows, groups, size): the values sharing one scale along the last axis. Blocks that do not
    divide K: the last block of each row is padded with zeros (which never widen a block's range)."""
    N, K = w.shape
    if grain == "tensor":
        return w.reshape(1, 1, N * K)
    size = K if grain == "channel" else int(grain[1:])
    pad = -K % size
    return torch.nn.functional.pad(w, (0, pad)).reshape(N, (K + pad) // size, size)


def ptq_method(bits: int, symmetric: bool, grain: str) -> QuantMethod:
    """Round-to-nearest uniform quantization (Jacob et al. 2018; the grid of Nagel et al. 2021, "A White
    Paper on Neural Network Quantization", sec. 2) for one scale per group g of weights:
      symmetric (absmax)   s = max|w_g| / (2^(b-1) - 1),  q = round(w / s) in [-(2^(b-1)-1), 2^(b-1)-1],
                           w ~ s q (the grid is symmetric around an exact 0; q stored offset by 2^(b-1))
      asymmetric (zero-point) s = (max w_g - min w_g) / (2^b - 1), z = round(-min / s), q = round(w / s) + z
                           in [0, 2^b - 1], w ~ s (q - z) (the range includes 0, so 0 stays exact)
    Groups: the whole tensor, one output row (per channel), or blocks of 32/64/128 inputs of a row
    (GGUF Q4_0/Q8_0 use 32; a last block short of the size where it does not divide K). Scales are stored in fp16 and quantization uses the fp16-rounded scale, so
    dequantize(quantize(W)) is what the model computes with. No kernel: every forward dequantizes."""
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    offset = 2 ** (bits - 1) if symmetric else 0
    name = f"int{bits}-{'sym' if symmetric else 'asym'}-{grain}"

    def scale_shape(N, K):
        return (1, 1) if grain == "tensor" else (N, 1 if grain == "channel" else -(-K // int(grain[1:])))

    def shapes(N, K):
        out = {"qweight": ((N, K * bits // 8), torch.uint8), "scales": (scale_shape(N, K), torch.float16)}
        if not symmetric:
            out["zeros"] = ((scale_shape(N, K)), torch.uint8)
        return out

    def quantize(w: torch.Tensor) -> Tensors:
        N, K = w.shape
        g = _grouped(w.float(), grain)  # (R, G, S)
        if symmetric:
            s = (g.abs().amax(-1) / qmax).clamp_min(1e-6).half()  # (R, G)
            q = torch.round(g / s.float()[..., None]).clamp(-qmax, qmax) + offset
            t = {"scales": s}
        else:
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            s = ((hi - lo) / qmax).clamp_min(1e-6).half()
            z = torch.round(-lo / s.float()).clamp(0, qmax)
            q = (torch.round(g / s.float()[..., None]) + z[..., None]).clamp(0, qmax)
            t = {"scales": s, "zeros": z.to(torch.uint8)}
        t["qweight"] = pack_bits(q.reshape(N, -1)[:, :K], bits)
        return t

    def dequantize(t, N, K, dtype):
        q = _grouped(unpack_bits(t["qweight"], bits, K).float(), grain)
        zero = t["zeros"].float() if not symmetric else torch.full((), float(offset))
        return ((q - zero[..., None]) * t["scales"].float()[..., None]).reshape(N, -1)[:, :K].to(dtype)

    def concat(ts, Ns, K):  # per-row scales: rows concatenate exactly
        return {k: torch.cat([t[k] for t in ts]) for k in ts[0]}

    return QuantMethod(
        name=name, shape_rule="in_features divisible by 8", accepts=lambda N, K: K % 8 == 0,
        shapes=shapes, quantize=quantize, dequantize=dequantize,
        concat=None if grain == "tensor" else concat,
        # the head's errors land on the logits directly: 8 bits there, as llama.cpp keeps `output` at Q6_K/Q8_0
        head=name if bits == 8 else "int8-sym-channel",
        fallback=None if name == "int8-sym-channel" else "int8-sym-channel")


def outlier_method(base: QuantMethod, k: int) -> QuantMethod:
    """Outlier-aware mixed precision: the k input features with the largest calibration activations keep
    their weight columns in fp16, the rest go to `base`. Weight-only form of LLM.int8()'s decomposition
    (Dettmers et al. 2022: a few feature dimensions carry activations > 6 and dominate the error of
    x W^T; they stay 16-bit) and of ATOM's outlier channels (Zhao et al. 2024) / AWQ's salient 1%
    (Lin et al. 2024): a weight error in column j costs |x_j| times more when x_j is large.
    Stored: base's tensors for W with those columns zeroed (so they do not stretch the scales),
    outlier_idx (k,) int32 and outlier_w (N, k) fp16. y = x W_base^T + x[:, idx] W_out^T, computed here
    by putting the columns back into the dequantized weight (exact where there are no outliers to keep:
    the columns are the base's dequantized ones then equal to W's columns up to fp16)."""

    def shapes(N, K):
        return {**base.shapes(N, K), "outlier_idx": ((k,), torch.int32), "outlier_w": ((N, k), torch.float16)}

    def quantize(w: torch.Tensor, act: torch.Tensor) -> Tensors:
        idx = torch.topk(act.float(), k).indices.sort().values
        rest = w.clone()
        rest[:, idx] = 0
        return {**base.quantize(rest), "outlier_idx": idx.to(torch.int32), "outlier_w": w[:, idx].half()}

    def split(t):
        return {n: v for n, v in t.items() if not n.startswith("outlier_")}

    def dequantize(t, N, K, dtype):
        w = base.dequantize(split(t), N, K, torch.float32)
        w[:, t["outlier_idx"].long()] = t["outlier_w"].float()
        return w.to(dtype)

    def concat(ts, Ns, K):  # q/k/v (gate/up) share their input, hence their outlier features
        if base.concat is None or any(not torch.equal(t["outlier_idx"], ts[0]["outlier_idx"]) for t in ts):
            return None
        return {**base.concat([split(t) for t in ts], Ns, K), "outlier_idx": ts[0]["outlier_idx"],
                "outlier_w": torch.cat([t["outlier_w"] for t in ts])}

    return QuantMethod(
        name=f"{base.name}-o{k}", shape_rule=f"{base.shape_rule}, at least {k} inputs",
        accepts=lambda N, K: base.accepts(N, K) and K >= k, shapes=shapes, quantize=quantize,
        dequantize=dequantize, concat=concat if base.concat is not None else None,
        head=base.head, fallback=base.fallback, calibrated=True)


METHODS: dict[str, QuantMethod] = {m.name: m for m in (INT8, INT4, nf4_method(), BF16)}


@functools.cache
def _from_spec(name: str) -> QuantMethod | None:
    """A record of the generated families, or None if `name` is not one of their spellings. Bit widths
    and block sizes outside the supported sets raise, naming the value."""
    m = _PTQ.fullmatch(name)
    if m:
        bits, sym, grain, k = int(m[1]), m[2] == "sym", m[3], m[4]
        if bits not in PTQ_BITS:
            raise LLMKitError(f"bit width {bits} is not supported in {name!r} (supported: "
                              f"{', '.join(map(str, PTQ_BITS))})")
        if grain not in PTQ_GRAINS:
            raise LLMKitError(f"block size {grain[1:]} is not supported in {name!r} (supported: 32, 64, 128)")
        rec = ptq_method(bits, sym, grain)
        if k is not None:
            if int(k) <= 0:
                raise LLMKitError(f"outlier count must be positive in {name!r}")
            rec = outlier_method(rec, int(k))
        return rec
    m = _NF4.fullmatch(name)
    if m:
        if int(m[1]) not in NF4_BLOCKS:
            raise LLMKitError(f"NF4 block size {m[1]} is not supported in {name!r} (supported: "
                              f"{', '.join(map(str, NF4_BLOCKS))})")
        return nf4_method(int(m[1]), bool(m[2]))
    return None


def with_block_size(name: str, block_size: int | None) -> str:
    """`--method int4-sym --block-size 64` -> "int4-sym-b64"; `nf4 --block-size 256` -> "nf4-b256-dq"."""
    if block_size is None:
        return name
    if re.fullmatch(r"int\d+-(sym|asym)", name):
        return f"{name}-b{block_size}"
    if name == "nf4":
        return f"nf4-b{block_size}-dq"
    raise LLMKitError(f"--block-size applies to int{{bits}}-sym, int{{bits}}-asym and nf4, not {name!r}")


def get_method(name: str) -> QuantMethod:
    if name in METHODS:
        return METHODS[name]
    rec = _from_spec(name)
    if rec is None:
        raise LLMKitError(f"unknown quantization {name!r}{closest(name, METHODS)} (known: {', '.join(METHODS)}, "
                          f"{SPEC_HELP})")
    return rec
