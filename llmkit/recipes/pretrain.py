"""Pretraining from scratch: the whole loop, written out.

    cfg = load_config(PretrainConfig, "run.yaml", ["optim.lr=1e-3"])
    summary = pretrain(cfg)

objective=span with a T5 preset (models/t5.py) trains an encoder-decoder on T5's span corruption
(train/span.py; sentinels and the decoder start token take ids after the tokenizer's); its run has no
next-token validation or samples.

Runs alone or under `torchrun --nproc_per_node=K` (train.strategy = ddp | fsdp). Global batch =
micro_batch_size x accumulation steps x world size; each rank reads its own rows of every batch.
Everything that decides the next step (weights, AdamW moments, step, data position, RNG, the running
weight mean of train.average_tail) is in the step checkpoints, so `resume` continues the run exactly.

`objective=mlm` with an encoder preset (tiny-bert, minilm-l6, bert-base) trains a BERT encoder with
the masked-LM objective instead (train/mlm.py): same data, loop and checkpoints; the final model is a
Hugging Face BERT folder (models/encoder.py `save_encoder`) for `llmkit fill-mask` and `llmkit embed`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ranged
from ..errors import LLMKitError
from ..io import locks_run_dir
from ..models import Encoder, ModelConfig, Transformer, build_model, save_encoder
from ..models.flops import flops_per_token, num_params
from ..train import checkpoint as ckpt
from ..train.average import TailAverage, in_tail
from ..train.data import BatchLoader, TokenShards, eval_windows, read_manifest
from ..train.dist import DistInfo, all_reduce_sum, broadcast_object, init_distributed, wrap_model
from ..train.loop import (MetricsLogger, autocast_context, evaluate, lm_loss, plot_metrics, progress_bar,
                          read_metrics, sample_text, seq2seq_loss, train_step)
from ..train.mfu import device_peak_flops, mfu
from ..train.optim import OPTIMIZERS
from ..train.schedule import decayed_lr, lr_at, set_lr
from .config import DataSection, OptimSection, TrainSection, check_sections, every


@dataclass
class PretrainData(DataSection):
    dir: str = ""  # a directory written by `llmkit data prepare`


@dataclass
class PretrainTrain(TrainSection):
    max_tokens: int | None = ranged(None, ">0")  # token budget: sets steps = max_tokens / (batch_size * seq_len)
    time_budget_s: float | None = ranged(None, ">0")  # wall-clock budget: stop then; the LR decays over the budget
    compile: bool = False
    # the final weights are the mean of the weights over this last fraction of the run (steps or wall
    # clock); 0 = the last weights. Tail/SWA averaging: train/average.py
    average_tail: float = ranged(0.0, "[0,1)")
    activation_checkpointing: bool = False
    eval_batches: int = ranged(20, ">=0")  # batches of validation windows (0 = the whole val split)
    sample_every: int = ranged(0, ">=0")  # 0 = only at the end
    sample_tokens: int = ranged(64, ">=0")
    sample_prompt: str = ""


@dataclass
class SpanSection:
    """T5 span corruption (train/span.py; Raffel et al. 2020): objective=span with a t5 preset."""
    noise_density: float = 0.15
    mean_span: float = 3.0


OBJECTIVES = ("clm", "mlm", "span")


@dataclass
class PretrainConfig:
    preset: str = "tiny-llama"  # a model preset (an encoder one with objective=mlm, a T5 one with span)
    model: dict = field(default_factory=dict)
    # clm: next token (decoders) | mlm: masked tokens (BERT encoders) | span: T5 span corruption (encoder-decoders)
    objective: str = "clm"
    span: SpanSection = field(default_factory=SpanSection)
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-3, min_lr=3e-4))
    train: PretrainTrain = field(default_factory=lambda: PretrainTrain(out_dir="runs/pretrain"))


def span_ids(cfg: PretrainConfig, vocab_size: int) -> tuple[list[int], int]:
    """Span objective: (sentinel ids, decoder start id), placed after the tokenizer's ids (the data has
    no T5 vocabulary): one sentinel per noise span of a window, then the start token."""
    from ..train.span import span_counts

    n = span_counts(cfg.data.seq_len, cfg.span.noise_density, cfg.span.mean_span)[1]
    return list(range(vocab_size, vocab_size + n)), vocab_size + n


def build_model_config(cfg: PretrainConfig, vocab_size: int):
    """Preset + overrides; vocab follows the tokenizer and the context the sequence length unless set.
    objective=span: a T5Config, its vocabulary grown by the sentinels and the decoder start token."""
    over = dict(cfg.model)
    if cfg.objective == "span":
        from ..models.t5 import T5_PRESETS, T5Config

        if cfg.preset not in T5_PRESETS:
            raise LLMKitError(f"objective=span trains an encoder-decoder: preset must be one of {', '.join(T5_PRESETS)}, "
                              f"got {cfg.preset!r}")
        sentinels, start = span_ids(cfg, vocab_size)
        over.setdefault("vocab_size", start + 1)
        over.setdefault("max_seq_len", cfg.data.seq_len + 1)
        over.setdefault("pad_token_id", start)
        over.setdefault("decoder_start_token_id", start)
        mcfg = T5Config.from_preset(cfg.preset, **over)
        if mcfg.vocab_size <= start:
            raise LLMKitError(f"model vocab_size {mcfg.vocab_size} leaves no room for the tokenizer's {vocab_size} "
                              f"ids, {len(sentinels)} sentinels and the start token")
        return mcfg
    over.setdefault("vocab_size", vocab_size)
    over.setdefault("max_seq_len", cfg.data.seq_len)
    mcfg = ModelConfig.from_preset(cfg.preset, **over)
    if mcfg.vocab_size < vocab_size:
        raise LLMKitError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if mcfg.max_seq_len < cfg.data.seq_len:
        raise LLMKitError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    return mcfg


def validate(cfg: PretrainConfig, world: int) -> tuple[int, int, int]:
    """Check the config; returns (micro batch, accumulation steps, total steps)."""
    t = cfg.train
    if not cfg.data.dir:
        raise LLMKitError("data.dir is not set (a directory from `llmkit data prepare`)")
    if cfg.objective not in OBJECTIVES:
        from ..errors import closest

        raise LLMKitError(f"unknown objective {cfg.objective!r}{closest(cfg.objective, OBJECTIVES)}; "
                          f"known: {', '.join(OBJECTIVES)}")
    micro, accum = check_sections(cfg.data, cfg.optim, t, world)
    from ..models.encoder import ENCODER_PRESETS

    if cfg.objective == "clm" and cfg.preset in ENCODER_PRESETS:
        raise LLMKitError(f"preset {cfg.preset!r} is an encoder: train it with objective=mlm")
    if not 0 <= t.average_tail < 1:
        raise LLMKitError(f"train.average_tail must be in [0, 1), got {t.average_tail}")
    steps = t.steps
    if t.max_tokens:
        steps = max(1, t.max_tokens // (t.batch_size * cfg.data.seq_len))
    return micro, accum, steps


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of storing them (Chen et al. 2016)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        fwd = layer.forward
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _full_model(model: torch.nn.Module, make) -> torch.nn.Module | None:
    """A plain model (`make()`) with the full weights on rank 0 (gathers FSDP shards); None on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ..train.checkpoint import _options

    sd = get_model_state_dict(model, options=_options())
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    plain = make()
    plain.load_state_dict(sd, strict=False)  # tied weights appear once in sd
    return plain


# what a pretraining run writes into its out_dir (and --force removes; anything else there is kept)
RUN_ARTEFACTS = ("checkpoints", "final", "metrics.jsonl", "config.json", "summary.json", "loss.png", "tensorboard")
# settings a resumed run may change: how long it runs and how it reports, not what it trains
RESUMABLE_CHANGES = ("train.steps", "train.max_tokens", "train.time_budget_s", "train.log_every", "train.eval_every",
                     "train.ckpt_every", "train.keep_last", "train.progress", "train.threads", "train.sample_every",
                     "train.sample_tokens", "train.sample_prompt", "train.eval_batches", "train.out_dir",
                     # how the same computation is laid out: DDP/FSDP/one process, accumulation, compile
                     "train.strategy", "train.device", "train.micro_batch_size", "train.compile",
                     "train.activation_checkpointing")


def clear_run(out: Path) -> None:
    import shutil

    for name in RUN_ARTEFACTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_run(saved: dict, now: dict, where) -> None:
    """--resume continues the run that wrote the checkpoint: the same model, data, optimiser and seed
    (only its length and reporting may change); another run's checkpoint is refused, naming a difference."""
    a, b = _flat(saved), _flat(now)
    diff = [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    if saved and diff:
        k = diff[0]
        raise LLMKitError(f"--resume: {where} belongs to a different run ({k} = {a.get(k)!r} there, {b.get(k)!r} "
                          f"here{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); resume with the same "
                          f"settings, or start over with --force")


@locks_run_dir  # one writer per train.out_dir
def pretrain(cfg: PretrainConfig, resume: bool | str = False, force: bool = False, tokenizer=None,
             on_eval=None) -> dict:
    """Train; returns a summary dict (also written to OUT/summary.json). `resume`: True for the
    latest checkpoint in OUT/checkpoints, or a checkpoint directory."""
    info: DistInfo = init_distributed(cfg.train.device)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    micro, accum, steps = validate(cfg, info.world)
    out = Path(t.out_dir)
    ckpt_root = out / "checkpoints"

    # ---- decide where to start (rank 0 looks, everyone agrees)
    start_ckpt = None
    if info.is_main:
        if resume:
            start_ckpt = ckpt.resume_checkpoint(resume, ckpt_root)
        elif out.exists() and any(out.iterdir()):
            if not force:
                raise LLMKitError(f"{out} already exists (pass --force to overwrite, or --resume to continue)")
            clear_run(out)  # --force starts a new run: none of the old run's checkpoints or metrics may remain
    start_ckpt = broadcast_object(str(start_ckpt) if start_ckpt else None)

    # ---- data and tokenizer
    manifest = read_manifest(cfg.data.dir)
    if tokenizer is None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(Path(cfg.data.dir) / "tokenizer")
    if tokenizer.fingerprint() != manifest["tokenizer_fingerprint"]:
        raise LLMKitError(f"the tokenizer does not match the one {cfg.data.dir} was prepared with")
    train_shards, val_shards = TokenShards(cfg.data.dir, "train"), TokenShards(cfg.data.dir, "val")
    loader = BatchLoader(train_shards, cfg.data.seq_len, t.batch_size, seed=t.seed, rank=info.rank, world=info.world)
    has_val = val_shards.n_tokens >= cfg.data.seq_len + 1
    val_reader = BatchLoader(val_shards, cfg.data.seq_len, 1, shuffle=False) if has_val else None
    span = cfg.objective == "span"  # validation and samples are next-token ones: not run for span corruption
    windows = eval_windows(val_shards, cfg.data.seq_len,
                           t.eval_batches * micro if t.eval_batches else None) if has_val and not span else []

    # ---- model and optimiser (same seed on every rank: identical initial weights)
    torch.manual_seed(t.seed)
    mlm = cfg.objective == "mlm"
    if mlm:  # a BERT encoder (train/mlm.py); mcfg is its modules' view, for the FLOP and parameter counts
        from ..train.mlm import Masker, build_encoder, mlm_evaluate, mlm_train_loss

        model = build_encoder(cfg.preset, dict(cfg.model), tokenizer, cfg.data.seq_len).to(info.device)
        ecfg = model.cfg
        mcfg = ecfg.module_config()
        masker = Masker(ecfg, tokenizer.special_ids | {i for i in (tokenizer.eos_id, tokenizer.pad_id)
                                                       if i is not None}, t.seed)
    else:
        mcfg = build_model_config(cfg, tokenizer.vocab_size)
        if getattr(mcfg, "mtp_depth", 0) and info.enabled and t.strategy == "fsdp":
            # mtp_loss runs the MTP modules after the wrapped forward, where FSDP has resharded their weights
            raise LLMKitError("model.mtp_depth > 0 needs train.strategy=ddp (or one process), not fsdp")
        model = build_model(mcfg).to(info.device)
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = wrap_model(model, t.strategy, info)
    fwd_model = torch.compile(model) if t.compile else model
    max_lr, min_lr = cfg.optim.peak(3e-3)
    optimizer = OPTIMIZERS[cfg.optim.name](model, max_lr, cfg.optim.weight_decay,
                                           (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    autocast = autocast_context(info.device, t.dtype)
    if span:
        from ..train.span import span_batch

        sentinels, start_id = span_ids(cfg, tokenizer.vocab_size)
        loss_fn = seq2seq_loss
    elif mlm:
        loss_fn = mlm_train_loss
    else:
        loss_fn = functools.partial(lm_loss, aux_coef=mcfg.router_aux_loss_coef if mcfg.n_expert else 0.0,
                                    mtp_coef=mcfg.mtp_loss_weight if mcfg.mtp_depth else 0.0)

    averager = TailAverage(model)
    start_step, elapsed_before = 0, 0.0
    if start_ckpt:
        state = ckpt.load_train_state(start_ckpt, model, optimizer)
        averager.load_state(state["average"])
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        start_step = int(state["step"])
        elapsed_before = float(state["loader"].get("elapsed_s", 0.0))
        check_same_run(state.get("config") or {}, dataclasses.asdict(cfg), start_ckpt)
        if start_step >= steps:
            raise LLMKitError(f"--resume: {start_ckpt} is at step {start_step}, not before the run's last step "
                              f"{steps}: set train.steps (or train.max_tokens) past {start_step} to train further")
    run_config = dataclasses.asdict(cfg)
    # the metrics file is read and validated before config.json is touched: a resume that fails
    # leaves the run directory as it was
    logger = MetricsLogger(out / "metrics.jsonl", enabled=info.is_main,
                           resume_step=start_step if start_ckpt else None)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")

    n_params = sum(p.numel() for p in _unique_params(model)) if span else num_params(mcfg)
    fpt = 6 * n_params if span else flops_per_token(mcfg, cfg.data.seq_len)  # T5: the 6N estimate
    peak, peak_src = device_peak_flops(info.device, t.dtype)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    if info.is_main:
        length = f"{t.time_budget_s:.0f} s" if t.time_budget_s else f"{steps} steps"
        print(f"model: {n_params:,} params ({mcfg.n_layer} layers, d_model {mcfg.d_model}, vocab {mcfg.vocab_size}); "
              f"{length} of {tokens_per_step:,}-token steps (batch {t.batch_size} = {micro} x {accum} accum "
              f"x {info.world} ranks); peak {peak / 1e9:.0f} GFLOP/s ({peak_src})", flush=True)

    def lr_for(step: int, elapsed: float) -> float:
        o = cfg.optim
        if t.time_budget_s and step >= o.warmup_steps:  # decay over the wall-clock budget
            return decayed_lr(elapsed / t.time_budget_s, max_lr=max_lr, min_lr=min_lr, kind=o.schedule)
        return lr_at(step, max_lr=max_lr, min_lr=min_lr, total_steps=steps, warmup_steps=o.warmup_steps,
                     kind=o.schedule)

    def run_eval(step: int) -> dict:
        if not windows:
            return {}
        # the eager model: a compiled one would recompile for eval mode, no_grad and a short last batch
        if mlm:
            res = mlm_evaluate(model, val_reader.read, windows, micro, masker, info.device, info.rank, info.world,
                               autocast)
        else:
            res = evaluate(model, val_reader.read, windows, micro, val_shards.bytes_per_token, info.device,
                           info.rank, info.world, autocast)
        logger.log({"step": step, **res})
        if on_eval:
            on_eval(step, res)
        return res

    last_saved = start_step if start_ckpt else None

    def save(step: int, metrics: dict) -> None:
        """The step checkpoint, once per step."""
        nonlocal last_saved
        if last_saved != step:
            ckpt.save_train_state(ckpt_root, step, model, optimizer, {**loader.state_dict(), "elapsed_s": elapsed},
                                  run_config, metrics, keep=t.keep_last, is_main=info.is_main,
                                  average=averager.state())
            last_saved = step

    # a time-budgeted run shows a bar over seconds (its ETA is the budget), otherwise over steps
    by_time = bool(t.time_budget_s)
    bar = progress_bar(int(t.time_budget_s) if by_time else steps, int(elapsed_before) if by_time else start_step,
                       enabled=t.progress and info.is_main, unit="s" if by_time else "step")
    t_start = time.perf_counter()
    elapsed = elapsed_before
    step = start_step
    last_val: dict = {}
    tok_s_ema = None
    samples: list[dict] = []
    model.train()
    while step < steps:
        t0 = time.perf_counter()
        lr = lr_for(step, elapsed)
        set_lr(optimizer, lr)
        x, y = loader.next_batch()  # this rank's rows: (micro * accum, T)
        if mlm:  # corrupted windows and the masked originals (labels -100 elsewhere)
            x, y = masker(x, step)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if span:  # corruption seeded by (seed, step): a resumed run draws the same spans
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
            micro_batches = [span_batch(a, sentinels, start_id, tokenizer.eos_id, cfg.span.noise_density,
                                        cfg.span.mean_span, gen) for a in x.split(micro)]
        else:
            micro_batches = [{"idx": a, "targets": b} for a, b in zip(x.split(micro), y.split(micro))]
        res = train_step(fwd_model, optimizer, micro_batches, loss_fn=loss_fn, grad_clip=cfg.optim.grad_clip,
                         autocast=autocast)
        # the logged loss is the next-token CE (MoE aux loss aside); a NaN in either stops the run
        loss, total = res["ce"], res["loss"]
        if info.enabled:  # the means over the global batch, for the log (each rank had a slice)
            both = all_reduce_sum(torch.tensor([loss, total], dtype=torch.float64, device=info.device))
            loss, total = float(both[0]) / info.world, float(both[1]) / info.world
        step += 1
        dt = time.perf_counter() - t0
        elapsed = elapsed_before + time.perf_counter() - t_start  # wall clock, evaluations included
        if not math.isfinite(total):
            good = ckpt.latest_checkpoint(ckpt_root)
            raise LLMKitError(f"loss became {total} at step {step}; stopped. Last good checkpoint: "
                              f"{good if good else 'none (none was saved yet)'}")
        if in_tail(elapsed / t.time_budget_s if t.time_budget_s else step / steps, t.average_tail):
            averager.update()
        tok_s = tokens_per_step / dt
        tok_s_ema = tok_s if tok_s_ema is None else 0.9 * tok_s_ema + 0.1 * tok_s
        out_of_time = bool(t.time_budget_s and elapsed >= t.time_budget_s)
        if info.enabled:
            out_of_time = bool(broadcast_object(out_of_time))
        final = step == steps or out_of_time
        if every(t.log_every, step) or final:
            logger.log({"step": step, "loss": loss, "lr": lr, "grad_norm": res["grad_norm"],
                        "tokens": step * tokens_per_step, "tokens_per_s": tok_s, "mfu": mfu(fpt, tok_s, peak),
                        "elapsed_s": round(elapsed, 3)})
        bar.update(min(int(elapsed), bar.total) - bar.n if by_time else 1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s_ema:,.0f}", **({"val": f"{last_val['val_loss']:.3f}"}
                                                                          if last_val else {}))
        if every(t.eval_every, step) and not final:
            last_val = run_eval(step)
        if every(t.sample_every, step) and not final and not span and not mlm:
            text = sample_text(model, tokenizer, t.sample_prompt, t.sample_tokens, seed=t.seed)
            samples.append({"step": step, "text": text})
            if info.is_main:
                bar.write(f"[step {step}] {text!r}")
        if every(t.ckpt_every, step) and not final:
            save(step, {"loss": loss, **last_val})
        if out_of_time:
            break
    bar.close()
    train_wall = time.perf_counter() - t_start

    # ---- end of run: evaluation, sample, checkpoints, plot, summary
    if averager.n:  # the step checkpoint keeps the last weights (a resume continues from them); the rest use the mean
        save(step, {"loss": loss, **last_val})
        averager.copy_to_model()
    last_val = run_eval(step) or last_val
    if not span and not mlm:  # an encoder does not generate; span runs have no next-token samples
        text = sample_text(model, tokenizer, t.sample_prompt, t.sample_tokens, seed=t.seed)
        samples.append({"step": step, "text": text})
    save(step, {"loss": loss, **last_val})
    plain = _full_model(model, (lambda: Encoder(ecfg)) if mlm else (lambda: build_model(mcfg)))
    summary = {}
    if info.is_main:
        from ..checkpoint import save_checkpoint

        if mlm:
            final_dir = save_encoder(plain, out / "final", tokenizer, force=True)
        else:
            final_dir = save_checkpoint(plain, out / "final", tokenizer, meta={"config": run_config}, force=True)
        records = read_metrics(out / "metrics.jsonl")
        plot_metrics(records, out / "loss.png", title=f"pretrain {mcfg.n_layer}L d{mcfg.d_model}")
        train_recs = [r for r in records if "tokens_per_s" in r]
        tail = train_recs[len(train_recs) // 10:] or train_recs  # skip warm-up steps in the averages
        mean_tok_s = (len(tail) * tokens_per_step / sum(tokens_per_step / r["tokens_per_s"] for r in tail)
                      if tail else 0.0)
        summary = {"steps": step, "tokens": step * tokens_per_step, "params": n_params, "train_wall_s": train_wall,
                   "elapsed_s": elapsed, "tokens_per_s": mean_tok_s, "mfu": mfu(fpt, mean_tok_s, peak),
                   "peak_flops": peak, "peak_source": peak_src, "flops_per_token": fpt, "final_loss": loss,
                   **last_val, "samples": samples, "final_checkpoint": str(final_dir), "world": info.world,
                   "averaged_steps": averager.n,
                   "strategy": t.strategy if info.enabled else "none", "objective": cfg.objective,
                   "model_config": dataclasses.asdict(ecfg) if mlm else mcfg.to_dict()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.close()
    return summary


def _unique_params(model: torch.nn.Module):
    return {id(p): p for p in model.parameters()}.values()  # a tied head counted once
