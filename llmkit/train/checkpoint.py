"""Resumable training state: everything needed to continue a run exactly where it stopped.

    RUN/checkpoints/step_00000100/
        model.safetensors   full (unsharded) weights, llmkit parameter names (fine-tuning: only those that train)
        train_state.json    step, data-loader position, RNG states, run config and the optimiser state's
        train_state.safetensors  structure, with every tensor in it (moments, torch RNG states) stored in the
                            safetensors file and referenced by key: no pickle anywhere (pack_state/unpack_state)
        info.json           step and metrics, for humans

Full state dicts keyed by parameter name (torch.distributed.checkpoint.state_dict) make a checkpoint
written under DDP, FSDP2 or one process load under any of them, at any world size. Each directory
is written atomically (a crash or a full disk leaves the previous checkpoints intact) and only the
last `keep` are kept. The schedule is a pure function of the step, so it needs no state.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import LLMKitError
from ..io import WriteError, atomic_dir, clean_interrupted

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_JSON, STATE_TENSORS = "train_state.json", "train_state.safetensors"
AVERAGE_FILE = "average.safetensors"  # a running weight mean (train.average.TailAverage), when one had started


def _options(full: bool = True, trainable_only: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=trainable_only,
                            strict=not trainable_only)


def gather_state(model: nn.Module, optimizer, trainable_only: bool = False) -> tuple[dict, dict]:
    """Full model and optimiser state dicts (a collective under FSDP: every rank must call it).
    trainable_only: leave out frozen parameters (a fine-tuning run's base weights, which it reloads)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(trainable_only=trainable_only))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- nested state without pickle
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def pack_state(obj, tensors: dict):
    """A nested state (dicts, lists, tuples, tensors, numbers, strings, None) -> a JSON-able skeleton;
    each tensor goes into `tensors` under a fresh key and is referenced as {"__tensor__": key}. Tuples
    and dicts with non-string keys are marked so they come back as they were (random.getstate())."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(m in obj for m in _MARKERS):
            return {k: pack_state(v, tensors) for k, v in obj.items()}
        return {"__items__": [[pack_state(k, tensors), pack_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [pack_state(x, tensors) for x in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint")


def unpack_state(obj, tensors: dict):
    """The inverse of pack_state."""
    if isinstance(obj, list):
        return [unpack_state(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unpack_state(x, tensors) for x in obj["__tuple__"])
        if "__items__" in obj:
            return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    return obj


def write_state(d: Path, state: dict) -> None:
    tensors: dict = {}
    skeleton = pack_state(state, tensors)
    save_file(tensors, d / STATE_TENSORS)
    (d / STATE_JSON).write_text(json.dumps(skeleton) + "\n")


def read_state(d: Path) -> dict:
    try:
        with safe_open(d / STATE_TENSORS, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return unpack_state(json.loads((d / STATE_JSON).read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError) as e:  # truncated or foreign files: say which
        raise LLMKitError(f"cannot read the training state in {d}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # safetensors' own errors (SafetensorError) derive from Exception only
        raise LLMKitError(f"cannot read {d / STATE_TENSORS}: {str(e).splitlines()[0]}") from None


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete step checkpoints under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def resume_checkpoint(resume: bool | str | Path, ckpt_root: str | Path) -> Path:
    """The step checkpoint `--resume` names: the latest under ckpt_root (resume=True) or the given one."""
    clean_interrupted(ckpt_root, r"step_\d+")  # a step dir cut off mid-swap is restored first
    found = Path(resume) if isinstance(resume, (str, Path)) else latest_checkpoint(ckpt_root)
    if found is None:
        raise LLMKitError(f"--resume: no checkpoint found under {ckpt_root}")
    return found


def split_aliases(state_dict: dict) -> tuple[dict, dict]:
    """(tensors, aliases): safetensors refuses tensors that share memory (tied embeddings: the
    embedding and the output head are one Parameter), so each shared tensor is stored once and the
    other names are recorded as aliases {name: stored name}."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in state_dict.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().contiguous()
    return tensors, aliases


def save_train_state(ckpt_root: str | Path, step: int, model: nn.Module, optimizer, loader_state: dict,
                     config: dict, metrics: dict | None = None, keep: int = 3, is_main: bool = True,
                     average: tuple[dict, int] | None = None, trainable_only: bool = False) -> Path | None:
    """Write RUN/checkpoints/step_XXXXXXXX atomically (rank 0 writes; all ranks must call), keep the last `keep`.
    `average`: (tensors, n) of a running weight mean (train.average.TailAverage.state()), stored beside.
    `trainable_only`: store only the parameters that train (and buffers), for fine-tuning."""
    model_sd, optim_sd = gather_state(model, optimizer, trainable_only)
    root = Path(ckpt_root)
    out = root / f"step_{step:08d}"
    error = None
    if is_main:
        clean_interrupted(root, r"step_\d+")  # what a run killed mid-save left (.step_*.tmp, .step_*.old)
        previous = latest_checkpoint(root)
        try:
            tensors, aliases = split_aliases(model_sd)
            with atomic_dir(out, force=True, owns=("*",)) as tmp:  # a step dir is wholly ours
                save_file(tensors, tmp / "model.safetensors",
                          metadata={"format": "pt", "step": str(step), "aliases": json.dumps(aliases)})
                write_state(tmp, {"step": step, "optimizer": optim_sd, "loader": loader_state, "rng": rng_state(),
                                  "config": config})
                if average:
                    save_file(average[0], tmp / AVERAGE_FILE, metadata={"n": json.dumps(average[1])})
                (tmp / "info.json").write_text(json.dumps({"step": step, "metrics": metrics or {}}, indent=2) + "\n")
        except (OSError, WriteError) as e:
            kept = f"; the previous checkpoint {previous} is intact" if previous else ""
            reason = e.reason if isinstance(e, WriteError) else (e.strerror or str(e))
            error = f"could not write checkpoint {out} ({reason}){kept}"
        else:
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise LLMKitError(error)
    return out


def load_train_state(ckpt_dir: str | Path, model: nn.Module, optimizer, trainable_only: bool = False) -> dict:
    """Load weights and optimiser state into (possibly wrapped/sharded) model and optimizer; every rank
    reads the full files. Returns the rest of the state: step, loader, rng, config, and "average":
    (full tensors, n) of the running weight mean, or None if the run had not started one.
    `trainable_only`: the checkpoint holds (at least) every parameter that trains; the rest stay."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    d = Path(ckpt_dir)
    if not all((d / f).is_file() for f in ("model.safetensors", STATE_JSON, STATE_TENSORS)):
        raise LLMKitError(f"{d} is not a training checkpoint (needs model.safetensors, {STATE_JSON} and {STATE_TENSORS})")
    with safe_open(d / "model.safetensors", framework="pt") as f:  # one pass: tensors and metadata
        model_sd = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, stored in aliases.items():  # tied weights were stored once
        model_sd[name] = model_sd[stored]
    state = read_state(d)
    if trainable_only:
        from .dist import unwrap

        missing = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and n not in model_sd]
        if missing:
            raise LLMKitError(f"checkpoint {d} does not fit this model: it lacks trainable {missing[0]!r}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    try:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"],
                       options=_options(trainable_only=trainable_only))
    except (RuntimeError, KeyError, ValueError) as e:
        raise LLMKitError(f"checkpoint {d} does not fit this model/optimiser: {str(e).splitlines()[0]}") from None
    state["average"] = None
    if (d / AVERAGE_FILE).is_file():
        with safe_open(d / AVERAGE_FILE, framework="pt") as f:
            state["average"] = {k: f.get_tensor(k) for k in f.keys()}, int(json.loads(f.metadata()["n"]))
    return state
