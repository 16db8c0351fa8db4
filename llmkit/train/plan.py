"""Compute and memory planning before a run (`llmkit plan`).

Chinchilla (Hoffmann et al. 2022): compute-optimal training uses about 20 tokens per parameter.
Training FLOPs ≈ 6·N·D (Kaplan et al. 2020): 2·N per token forward, 4·N backward.
Memory per parameter for weights + gradients + optimiser states (activations excluded):
  fp32 AdamW                 4 + 4 + 8 (m, v)                      = 16 bytes
  bf16 mixed precision       2 (bf16 weights) + 2 (grads) + 4 (fp32 master) + 8 (m, v) = 16 bytes
  8-bit Adam (Dettmers 2022) 4 + 4 + 2 (m, v in 8 bit)             = 10 bytes
  LoRA (Hu et al. 2021)      2 (frozen bf16 base); trainable adapters ~1% at 16 bytes
  QLoRA (Dettmers et al. 2023) ~0.5 + double-quantised scales ≈ 0.52 (4-bit NF4 base); adapters as LoRA

Mixture-of-Experts (Mixtral, Jiang et al. 2024): a token runs only n_expert_per_tok of the n_expert
experts, so compute (FLOPs, throughput) and the Chinchilla token budget use the *active* parameters
N_active, while memory holds every expert and uses the total N. Dense models: N_active = N.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LLMKitError, closest
from .mfu import CUDA_PEAKS

TOKENS_PER_PARAM = 20.0
LORA_FRACTION = 0.01  # trainable share of parameters typical for rank-16 adapters on all linears

# bytes per parameter (weights, gradients, optimiser states) for each regime
REGIMES = {
    "fp32 AdamW": (4.0, 4.0, 8.0),
    "bf16 mixed + fp32 AdamW": (2.0 + 4.0, 2.0, 8.0),
    "bf16 + 8-bit Adam": (2.0 + 4.0, 2.0, 2.0),
    "LoRA (bf16 base)": (2.0 + LORA_FRACTION * 4.0, LORA_FRACTION * 4.0, LORA_FRACTION * 8.0),
    "QLoRA (NF4 base)": (0.516 + LORA_FRACTION * 4.0, LORA_FRACTION * 4.0, LORA_FRACTION * 8.0),
}


def gpu_peak_flops(name: str) -> tuple[float, str]:
    """(dense bf16 peak FLOP/s, the GPU's name) for `--gpu NAME`: 'H100', 'h100-sxm', 'rtx4090', ...

    The peaks are train/mfu.py's CUDA_PEAKS, the vendors' datasheet dense (no 2:4 sparsity) bf16
    tensor-core rates, e.g. NVIDIA A100 datasheet: 312 TFLOP/s; H100 SXM / H200: 989; L4: 121;
    GeForce RTX 4090 (Ada whitepaper, fp32 accumulate): 165."""
    def key(s: str) -> str:
        return "".join(c for c in s.lower() if c.isalnum())

    table = {key(k): (v, k) for k, v in CUDA_PEAKS.items()}
    hit = table.get(key(name))
    if hit is None:
        raise LLMKitError(f"--gpu {name}: unknown GPU; known: {', '.join(CUDA_PEAKS)} (or give --peak-tflops)"
                          f"{closest(name, CUDA_PEAKS)}")
    return hit


@dataclass
class Plan:
    params: int  # total: what memory holds
    tokens: float
    flops: float
    gpus: int
    tokens_per_s: float | None  # aggregate throughput the time estimate uses
    throughput_source: str
    memory: dict[str, tuple[float, float, float, float]]  # regime -> (weights, grads, optim, total) bytes
    active_params: int | None = None  # per token (MoE: the routed experts only); None = params

    @property
    def compute_params(self) -> int:
        return self.active_params or self.params

    @property
    def seconds(self) -> float | None:
        return self.tokens / self.tokens_per_s if self.tokens_per_s else None


def make_plan(params: int, tokens: float | None = None, gpus: int = 1, tokens_per_s: float | None = None,
              peak_flops: float | None = None, mfu: float = 0.4, source: str = "",
              active_params: int | None = None) -> Plan:
    """Plan for N params (N_active of them used per token, default all): D (default Chinchilla
    20·N_active), 6·N_active·D FLOPs, memory table over all N, time.

    Throughput: given tokens/s (per device) or, failing that, peak_flops · mfu / (6·N_active) per device."""
    if params <= 0:
        raise LLMKitError(f"--params must be positive, got {params}")
    if active_params is not None and not 0 < active_params <= params:
        raise LLMKitError(f"active parameters must be in 1..{params}, got {active_params}")
    n = active_params or params
    if gpus <= 0:
        raise LLMKitError(f"--gpus must be positive, got {gpus}")
    D = float(tokens) if tokens else TOKENS_PER_PARAM * n
    if D <= 0:
        raise LLMKitError(f"--tokens must be positive, got {tokens}")
    flops = 6.0 * n * D
    if tokens_per_s is None and peak_flops:
        tokens_per_s = peak_flops * mfu / (6.0 * n)
        source = source or f"{peak_flops / 1e12:.1f} TFLOP/s peak at {mfu:.0%} MFU"
    agg = tokens_per_s * gpus if tokens_per_s else None
    mem = {name: (w * params, g * params, o * params, (w + g + o) * params) for name, (w, g, o) in REGIMES.items()}
    return Plan(params, D, flops, gpus, agg, source or "measured", mem, active_params)


def _human(x: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.2f} {unit}".strip()


def _bytes(x: float) -> str:
    for div, suffix in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if x >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f} B"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def plan_markdown(p: Plan) -> str:
    """The plan as Markdown tables (used by `llmkit plan` and the speedrun report)."""
    n = p.compute_params
    lines = ["| quantity | value |", "|---|---|", f"| parameters N | {_human(p.params)} ({p.params:,}) |"]
    if n != p.params:
        lines.append(f"| active parameters per token | {_human(n)} ({n:,}); FLOPs and tokens use these |")
    lines += [f"| training tokens D | {_human(p.tokens)} ({p.tokens / n:.1f} per parameter; Chinchilla ≈ 20) |",
              f"| training FLOPs ≈ 6·N·D | {p.flops:.3g} |",
              f"| devices | {p.gpus} |"]
    if p.seconds is not None:
        lines.append(f"| throughput | {p.tokens_per_s:,.0f} tokens/s ({p.throughput_source}) |")
        lines.append(f"| time | {_duration(p.seconds)} |")
    lines += ["", "| memory regime (weights + grads + optimiser, no activations) | weights | grads | optimiser "
              "| total | per device (sharded, FSDP) |", "|---|---|---|---|---|---|"]
    for name, (w, g, o, t) in p.memory.items():
        lines.append(f"| {name} | {_bytes(w)} | {_bytes(g)} | {_bytes(o)} | {_bytes(t)} | {_bytes(t / p.gpus)} |")
    return "\n".join(lines) + "\n"
