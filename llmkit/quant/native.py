"""llmkit's own CPU kernels (_kernels.c) where torch's are slow: int4/int8 weight matmuls and a decode step's
attention (`attn_decode`, which models/modules.py `sdpa` calls for one query per row).

torch 2.13's weight-only CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are vectorised
for AVX-512. On an AMD EPYC with AVX2 and no AVX-512, torch's int4 kernel read one decode step's weights at
6 GB/s (these loops: 8.4 GB/s; int8 weights 7.6 vs 9.6 GB/s) and eager decode ran at 0.27x llama.cpp (now
0.45x, 0.76x compiled: BENCHMARKS.md, "On an AVX2-only CPU" and its stop-32/33 parts). On such CPUs the int4/int8 methods call these C
loops instead (llmkit/quant/methods.py); elsewhere torch's.

The C file is compiled at first use with the system C compiler (`cc`, ~1 s) into llmkit's cache
(~/.cache/llmkit/kernels, keyed by the source's hash, written atomically) and loaded with ctypes: no torch
headers and no build step at install. Without a compiler, or where the build fails, `available()` is False
and torch's kernels run: same results up to rounding, slower.

Under torch.compile the kernels are custom ops (`llmkit::int4_mm`, `llmkit::int8_mm`) with shape functions,
so a compiled decode step calls them as extern kernels; eager calls go straight to ctypes (no dispatcher).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SRC = Path(__file__).with_name("_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def _runs_here() -> bool:
    """The C loops need an x86 CPU with AVX2 (+FMA, which every AVX2 CPU that torch detects has)."""
    return platform.machine().lower() in ("x86_64", "amd64") and bool(torch.cpu._is_avx2_supported())


def wanted() -> bool:
    """Whether this CPU should use llmkit's kernels: x86 with AVX2 and no AVX-512 (torch's kernels take
    over from AVX-512 on, where they were measured fast: BENCHMARKS.md)."""
    return _runs_here() and not torch.cpu._is_avx512_supported()


def _build(cache: Path) -> Path | None:
    """Compile _kernels.c once per source version into `cache`; None if no compiler or it fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src = SRC.read_bytes()
    key = hashlib.sha256(src + " ".join((cc,) + FLAGS).encode()).hexdigest()[:16]
    out = cache / f"llmkit-kernels-{key}.so"
    if out.exists():
        return out
    tmp = None
    try:  # an unwritable cache or a failing compiler means torch's kernels, not an error
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        r = subprocess.run([cc, *FLAGS, str(SRC), "-o", tmp, "-lm"], capture_output=True, timeout=120)
        if r.returncode != 0:
            return None
        os.replace(tmp, out)  # atomic: a concurrent process sees the old name absent or the whole file
        return out
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The built library (any x86 CPU with AVX2 + FMA: the tests run it on AVX-512 CPUs too), or None."""
    if not _runs_here():
        return None
    from ..hub import cache_dir

    path = _build(cache_dir() / "kernels")
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.llmkit_int4_mm.argtypes = [vp, i64, i64, vp, vp, i64, vp]
    lib.llmkit_int8_mm.argtypes = [vp, i64, i64, vp, vp, i64, vp]
    lib.llmkit_int4_dequant.argtypes = [vp, vp, i64, i64, vp]
    lib.llmkit_int4_mm.restype, lib.llmkit_int8_mm.restype, lib.llmkit_int4_dequant.restype = ctypes.c_int, None, None
    lib.llmkit_attn_decode.argtypes = [vp, i64, i64, i64, i64, i64, vp, vp, i64, i64, vp, i64, ctypes.c_float, vp]
    lib.llmkit_attn_decode.restype = ctypes.c_int
    return lib


_available: bool | None = None


def available() -> bool:
    """llmkit's kernels are wanted on this CPU and built: int4/int8 layers use them (a property of the
    process, decided once: the int4 runtime layout follows it). Kept in a plain module global rather than
    functools.cache: dynamo reads a global bool as a constant, while a cached function broke the compiled
    decode step into 25 graphs (and `torch.compiler.assume_constant_result` imports dynamo, +2 s of cold start)."""
    global _available
    if _available is None:
        _available = wanted() and _lib() is not None
    return _available


def _int4_mm_eager(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, N: int) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    M, K = x.shape
    y = torch.empty(M, N)
    if _lib().llmkit_int4_mm(x.data_ptr(), M, K, qweight.data_ptr(), scales.data_ptr(), N, y.data_ptr()):
        raise MemoryError(f"llmkit int4 kernel: no memory for a copy of its {M}x{K} input")
    return y


def _int8_mm_eager(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    M, K = x.shape
    N = qweight.size(0)
    y = torch.empty(M, N)
    _lib().llmkit_int8_mm(x.data_ptr(), M, K, qweight.data_ptr(), scales.data_ptr(), N, y.data_ptr())
    return y


# The same calls as operators for torch.compile graphs (opaque extern kernels with shape functions).
# Registered through torch.library.Library rather than the @custom_op decorator, whose Python wrapper costs
# several times as much per call (a compiled SmolLM2 step makes 121 of these calls).
_OPS = torch.library.Library("llmkit", "DEF")
_OPS.define("int4_mm(Tensor x, Tensor qweight, Tensor scales, int N) -> Tensor")
_OPS.define("int8_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor")
_OPS.impl("int4_mm", _int4_mm_eager, "CPU")
_OPS.impl("int8_mm", _int8_mm_eager, "CPU")


@torch.library.register_fake("llmkit::int4_mm")
def _(x, qweight, scales, N):
    return x.new_empty(x.shape[0], N, dtype=torch.float32)


@torch.library.register_fake("llmkit::int8_mm")
def _(x, qweight, scales):
    return x.new_empty(x.shape[0], qweight.size(0), dtype=torch.float32)


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, N: int) -> torch.Tensor:
    """x (M, K) -> (M, N) fp32 with W int4 in llmkit's layout: qweight (N, K/2) uint8, scales (N, K/32, 2)
    bf16 (s, z), w = (q - 8) s + z. x is rounded to int16 per group of 32 inside, the same for a row alone or
    in a batch (_kernels.c)."""
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.int4_mm(x, qweight, scales, N)
    return _int4_mm_eager(x, qweight, scales, N)


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """(N, K) fp32 weight of int4_mm's layout, w = (q - 8) s + z (eager only: prefill and backward)."""
    w = torch.empty(N, K)
    qweight, scales = qweight.contiguous(), scales.contiguous()  # held here: C reads their memory
    _lib().llmkit_int4_dequant(qweight.data_ptr(), scales.data_ptr(), N, K, w.data_ptr())
    return w


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) fp32 with W = qweight (N, K) int8 * scales (N,) bf16 per row; fp32 activations."""
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.int8_mm(x, qweight, scales)
    return _int8_mm_eager(x, qweight, scales)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None) -> torch.Tensor | None:
    """Attention of one query per row, a decode step's: q (B, H, 1, D), k and v (B, KH, S, D) slices of a
    KV cache (slots D floats apart), mask None or bool (B|1, 1, 1, S) -> (B, H, 1, D) fp32, with query head h
    reading K/V head h // (H / KH). The same values as F.scaled_dot_product_attention up to fp32 rounding
    (two-pass softmax, exp to ~2 ulp: _kernels.c llmkit_attn_decode). None where the arguments are not this
    kernel's (then the caller runs torch's): other dtypes, layouts or mask shapes, D % 8 != 0."""
    B, H, T, D = q.shape
    if T != 1 or k.dim() != 4 or k.shape != v.shape or k.size(-1) != D or D % 8 or k.size(0) != B:
        return None
    KH, S = k.size(1), k.size(2)
    if (H % KH or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32
            or k.stride() != v.stride() or k.stride(-1) != 1 or k.stride(-2) != D or not q.is_contiguous()):
        return None
    mask_sb = 0
    if mask is not None:
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, S) or mask.size(0) not in (1, B)
                or mask.stride(-1) != 1):
            return None
        mask_sb = mask.stride(0) if mask.size(0) > 1 else 0
    out = torch.empty(B, H, 1, D)
    if _lib().llmkit_attn_decode(q.data_ptr(), B, H, KH, S, D, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                                 None if mask is None else mask.data_ptr(), mask_sb,
                                 D ** -0.5 if scale is None else scale, out.data_ptr()):
        raise MemoryError(f"llmkit decode attention: no memory for the scores of {S} slots")
    return out
