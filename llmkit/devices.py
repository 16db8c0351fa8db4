"""Which device a command runs on: `--device auto|cpu|cuda|mps` (and `cuda:N`), resolved once.

auto picks CUDA when present, then Apple's MPS, then the CPU. Asking for a device this machine
lacks is the user's to fix, so it is an `LLMKitError` (one line, exit 2), never a torch traceback
at the first tensor moved there.
"""

from __future__ import annotations

import torch

from .errors import LLMKitError, closest

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' (or a torch.device) -> an available torch.device."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise LLMKitError(f"--device {name}: not one of {', '.join(DEVICES)} (or cuda:N){closest(kind, DEVICES)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LLMKitError(f"--device {name}: CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise LLMKitError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not _mps_available():
        raise LLMKitError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    return torch.device(name)


def add_device_arg(p) -> None:
    """The shared `--device` flag of every command that runs a model."""
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,mps}",
                   help="where the model runs: auto (default) = CUDA if present, then MPS, then CPU; "
                   "cuda:N for one GPU")


def model_device(model) -> torch.device:
    """The device a model's weights live on (where its inputs and caches must be created)."""
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels of `device` (timing on an accelerator measures nothing otherwise)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()
