"""Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B): achieved model FLOP/s / peak.

Peak on CUDA: the datasheet dense bf16 rate of the GPU; on CPU: a measured matmul rate in the dtype
the matmuls run in (fp32, or bf16 under autocast) with the threads this process uses (a datasheet
peak would say nothing about a shared 2-core box).
"""

from __future__ import annotations

import time

import torch

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets
CUDA_PEAKS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
    "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}

_measured: dict[tuple, float] = {}


def measure_cpu_matmul_flops(n: int = 512, seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n matmul in `dtype` on this CPU with the current torch thread count (cached)."""
    key = (n, torch.get_num_threads(), dtype)
    if key in _measured:
        return _measured[key]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        a @ b
        reps += 1
    _measured[key] = 2 * n**3 * reps / dt
    return _measured[key]


def cpu_has_fast_bf16(min_speedup: float = 1.5) -> bool:
    """Whether bf16 matmuls beat fp32 ones by `min_speedup` here (AMX or AVX512-BF16 units); without
    them torch emulates bf16 and it is slower than fp32."""
    return measure_cpu_matmul_flops(dtype=torch.bfloat16, seconds=0.2) >= min_speedup * measure_cpu_matmul_flops(
        seconds=0.2)


def device_peak_flops(device: torch.device | str = "cpu", dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for `device`, the matmuls running in `dtype`."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in CUDA_PEAKS.items():  # most specific names first
            if key in name:
                return peak, f"{name} datasheet bf16 peak"
        return 0.0, f"{name} (peak unknown)"
    name = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")  # auto on CPU = fp32
    dt = getattr(torch, dtype) if name != "fp32" else torch.float32
    return measure_cpu_matmul_flops(dtype=dt), f"measured {name} matmul, {torch.get_num_threads()} threads"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_token * tokens_per_s / peak if peak > 0 else float("nan")
