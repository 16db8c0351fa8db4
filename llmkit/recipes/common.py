"""What every training recipe does around its loop, written once: claim the output directory and find
the step checkpoint to resume from (`start_point`), seed and size torch (`seed_torch`), load the base
model (`load_base`), restore a step checkpoint's optimiser, data position and RNG (`restore`), and write
the trained result (`write_model`), close the run (`finish_run`: metrics out of OUT.partial, plots, the
summary JSON), and stop a run whose numbers stopped being finite (`stop_if_not_finite`). The loops themselves stay in the recipes."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..io import atomic_write_json, check_overwrite
from ..peft import get_method, save_adapter
from ..train import checkpoint as ckpt
from ..train.loop import read_metrics
from ..train.dist import DistInfo, broadcast_object


def start_point(out: Path, resume: bool | str, force: bool, info: DistInfo) -> tuple[Path, Path, str | None]:
    """(OUT.partial, its checkpoints folder, the step checkpoint to resume from or None), decided by
    rank 0 and agreed by all; fails now, not after training, when OUT exists or an interrupted run
    would be overwritten silently."""
    partial = out.with_name(out.name + ".partial")  # metrics and step checkpoints until OUT is written
    ckpt_root = partial / "checkpoints"
    start_ckpt = None
    if info.is_main:
        check_overwrite(out, force)
        if resume:
            start_ckpt = ckpt.resume_checkpoint(resume, ckpt_root)
        elif partial.exists():
            if not force:
                raise LLMKitError(f"{partial} holds an interrupted run: pass --resume to continue it "
                                  f"or --force to start over")
            shutil.rmtree(partial)
    return partial, ckpt_root, broadcast_object(str(start_ckpt) if start_ckpt else None)


def load_base(name: str, base_adapter: str | None = None):
    """(model, tokenizer) of `name`, with `base_adapter` (a LoRA) merged in: one plain model to train."""
    from ..loading import load_model

    model, tokenizer = load_model(name, adapter=base_adapter, dtype=torch.float32)  # a GGUF base dequantised: trainable
    if base_adapter:
        from ..peft import unload

        with torch.no_grad():
            unload(model, merge=True)  # continue from base + adapter as one plain model
    return model, tokenizer


def write_model(model: nn.Module, out: Path, method: str, base_name: str, tokenizer, meta: dict) -> None:
    """The trained result: the method's adapter files, or a full checkpoint (full, selective)."""
    if get_method(method).saves_adapter:
        save_adapter(model, out, base_model=base_name, force=True, extra=meta, method=method)
    else:
        from ..checkpoint import save_checkpoint

        save_checkpoint(model, out, tokenizer=tokenizer, meta=meta, force=True)


def seed_torch(train) -> None:
    """The run's seed, and its CPU threads when set (train: a TrainSection)."""
    torch.manual_seed(train.seed)
    if train.threads:
        torch.set_num_threads(train.threads)


def restore(start_ckpt: str | None, model: nn.Module, optimizer, loader) -> tuple[int, dict]:
    """Load a step checkpoint of trainable weights into model/optimizer, the data position into `loader`
    (anything with load_state_dict) and the RNG: -> (its step, its train state); (0, {}) for a fresh run."""
    if not start_ckpt:
        return 0, {}
    state = ckpt.load_train_state(start_ckpt, model, optimizer, trainable_only=True)
    loader.load_state_dict(state["loader"])
    ckpt.set_rng_state(state["rng"])
    return int(state["step"]), state


def stop_if_not_finite(values: dict, where: str, ckpt_root: Path | None = None, hint: str = "") -> None:
    """Stop training when a reward, loss or gradient norm in `values` is NaN or infinite: a one-line
    LLMKitError naming it, `where` it happened (the step) and the last good step checkpoint. The recipes
    call this before they write the step's checkpoint, so no checkpoint ever holds a poisoned state;
    `--resume` continues from the last good one."""
    bad = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not math.isfinite(v)]
    if not bad:
        return
    good = ckpt.latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    kept = (f"; the last good checkpoint {good} is kept (--resume continues from it)" if good
            else "; no step checkpoint was written yet" if ckpt_root is not None else "")
    what = f"{bad[0][0]} became {bad[0][1]}" + "".join(f", {k} {v}" for k, v in bad[1:])
    raise LLMKitError(f"{what} at {where}{kept}" + (f"; {hint}" if hint else ""))


def finish_run(out: Path, partial: Path, name: str, resolved: dict, summary: dict,
               plot: Callable[[list[dict]], None] | None = None) -> None:
    """Close a finished run whose weights are already in `out`: move metrics.jsonl out of OUT.partial, draw
    the plots (`plot(records)`), write NAME.json (resolved config + summary), then drop OUT.partial; the run
    is complete, so its step checkpoints are spent."""
    os.replace(partial / "metrics.jsonl", out / "metrics.jsonl")
    if plot is not None:
        plot(read_metrics(out / "metrics.jsonl"))
    atomic_write_json(out / f"{name}.json", {"config": resolved, "summary": summary})
    shutil.rmtree(partial, ignore_errors=True)
