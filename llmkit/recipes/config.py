"""The configuration sections every training recipe shares (pretrain, finetune, and the alignment and
distillation recipes to come), and their one validation.

A recipe's config nests them under the same keys, adds its own sections beside them, and may give a
shared section its own defaults:

    @dataclass
    class FinetuneConfig:
        model: str = ""
        data: SFTDataSection = ...                                # seq_len (shared) + files, packing...
        optim: OptimSection = field(default_factory=lambda: OptimSection(weight_decay=0.0))
        train: TrainSection = field(default_factory=lambda: TrainSection(steps=100, batch_size=4))
        lora: LoRAConfig = ...                                    # the method's own section

Loaded by `llmkit.config.load_config` (YAML + `key=value` overrides, one number coercion), so
`optim.lr=1e-4 train.steps=200 data.seq_len=512` mean the same thing in every recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ranged
from ..errors import LLMKitError
from ..train.dist import DEVICES, STRATEGIES
from ..train.optim import OPTIMIZERS
from ..train.schedule import KINDS

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DataSection:
    seq_len: int = ranged(256, ">0")  # tokens per training row


@dataclass
class OptimSection:
    lr: float | None = ranged(None, ">0")  # peak learning rate; None: the recipe's default (fine-tuning: the method's)
    min_lr: float | None = ranged(None, ">=0")  # the LR at the end of the decay; None: lr / 10
    name: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    warmup_steps: int = ranged(100, ">=0")
    weight_decay: float = ranged(0.1, ">=0")
    beta1: float = ranged(0.9, "[0,1)")
    beta2: float = ranged(0.95, "[0,1)")
    eps: float = ranged(1e-8, ">0")
    grad_clip: float = ranged(1.0, ">=0")  # 0 = no clipping

    def peak(self, default: float) -> tuple[float, float]:
        """(lr, min_lr) with the recipe's default filled in."""
        lr = self.lr if self.lr is not None else default
        return lr, self.min_lr if self.min_lr is not None else lr / 10


@dataclass
class TrainSection:
    out_dir: str = ""
    steps: int = ranged(1000, ">0")
    batch_size: int = ranged(32, ">0")  # global rows per optimiser step
    micro_batch_size: int | None = ranged(None, ">0")  # rows per rank per forward; None = batch_size / world (no accumulation)
    seed: int = ranged(1337, "[0,9.2e18]")
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | mps
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 elsewhere
    threads: int | None = ranged(None, ">0")  # torch CPU threads (None: leave as is)
    strategy: str = "ddp"  # ddp | fsdp | none (only used under torchrun with >1 process)
    log_every: int = ranged(1, ">=0")  # 0 = only the last step
    eval_every: int = ranged(200, ">=0")  # 0 = only at the end
    ckpt_every: int = ranged(500, ">=0")  # 0 = only at the end
    keep_last: int = ranged(3, ">=0")  # step checkpoints kept
    progress: bool = True


def every(n: int, step: int) -> bool:
    """Whether an `*_every = n` action falls on `step`; n = 0 means never (the recipe still runs it at
    the end)."""
    return n > 0 and step % n == 0


def check_inputs(cfg, data_hint: str = "--data FILE[,FILE...]") -> None:
    """What every training recipe needs before anything loads: a model, data files (a YAML string
    becomes a one-item list), an output directory; a one-line error naming the missing flag."""
    if not cfg.model:
        raise LLMKitError("no model given (--model)")
    if isinstance(cfg.data.files, str):  # `files: a.jsonl` in YAML
        cfg.data.files = [cfg.data.files]
    if not cfg.data.files:
        raise LLMKitError(f"no data given ({data_hint})")
    if not cfg.train.out_dir:
        raise LLMKitError("no output directory given (--out)")


def check_sections(data: DataSection, optim: OptimSection, train: TrainSection, world: int) -> tuple[int, int]:
    """Validate the shared sections; returns (micro batch per rank, accumulation steps)."""
    if optim.name not in OPTIMIZERS:
        raise LLMKitError(f"optim.name {optim.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if optim.name == "muon" and world > 1 and train.strategy == "fsdp":
        raise LLMKitError("optim.name=muon needs whole weight matrices: use train.strategy=ddp, not fsdp")
    if optim.schedule not in KINDS:
        raise LLMKitError(f"optim.schedule {optim.schedule!r} is not one of {', '.join(KINDS)}")
    if (optim.lr is not None and optim.lr <= 0) or (optim.min_lr is not None and optim.min_lr < 0):
        raise LLMKitError(f"optim.lr must be > 0 and optim.min_lr >= 0 (got {optim.lr}, {optim.min_lr})")
    if train.dtype not in DTYPES:
        raise LLMKitError(f"train.dtype {train.dtype!r} is not one of {', '.join(DTYPES)}")
    if train.strategy not in STRATEGIES:
        raise LLMKitError(f"train.strategy {train.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if train.device.split(":")[0] not in DEVICES:
        raise LLMKitError(f"train.device {train.device!r} is not one of {', '.join(DEVICES)}")
    for name, v in (("train.batch_size", train.batch_size), ("train.steps", train.steps),
                    ("data.seq_len", data.seq_len)):
        if v <= 0:
            raise LLMKitError(f"{name} must be positive, got {v}")
    for name in ("log_every", "eval_every", "ckpt_every", "keep_last"):
        if getattr(train, name) < 0:
            raise LLMKitError(f"train.{name} must be >= 0 (0 = never), got {getattr(train, name)}")
    micro = train.micro_batch_size or train.batch_size // world
    if micro <= 0 or train.batch_size % (micro * world):
        raise LLMKitError(f"train.batch_size {train.batch_size} must be a multiple of micro_batch_size {micro} "
                          f"x world size {world}")
    return micro, train.batch_size // (micro * world)
