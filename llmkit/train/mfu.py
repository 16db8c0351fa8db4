"""Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B): achieved model FLOP/s / peak.

Peak on CUDA: the datasheet dense bf16 rate of the GPU; on CPU: a measured fp32 matmul rate with
the threads this process uses (a datasheet peak would say nothing about a shared 2-core box).
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


def measure_cpu_matmul_flops(n: int = 512, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of an n x n matmul on this CPU with the current torch thread count (cached)."""
    key = (n, torch.get_num_threads())
    if key in _measured:
        return _measured[key]
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        a @ b
        reps += 1
    _measured[key] = 2 * n**3 * reps / dt
    return _measured[key]


def device_peak_flops(device: torch.device | str = "cpu") -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in CUDA_PEAKS.items():  # most specific names first
            if key in name:
                return peak, f"{name} datasheet bf16 peak"
        return 0.0, f"{name} (peak unknown)"
    return measure_cpu_matmul_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads"


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_token * tokens_per_s / peak if peak > 0 else float("nan")
