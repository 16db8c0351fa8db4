"""The `llmkit` command. Each module in this package that defines `register(subparsers)` adds
one subcommand (its parser sets `func`), so a new stage adds a file and touches nothing else.

Errors meant for the user (`LLMKitError`) print one line and exit 2; set LLMKIT_DEBUG=1 for
the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys

from ..errors import LLMKitError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or, when `argv` names one (`generate ...`; module fill_mask for
    `fill-mask`), of that one only: registering a subcommand imports its module, and importing all of
    them costs ~0.4 s of every command's cold start."""
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit: train tokenizers, pretrain, fine-tune "
                                     "(PEFT), generate, chat, score, evaluate and benchmark language models.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    want = argv[0].replace("-", "_") if argv else None
    for name in [want] if want in names else names:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling a nargs='*' positional at the first option, so `--force lr=1e-3`
        # leaves the override unparsed: hand such key=value words to the subcommand's overrides.
        name = next((n for n in ("overrides", "override", "set") if isinstance(getattr(args, n, None), list)), None)
        if name and all("=" in e and not e.startswith("-") for e in extra):
            getattr(args, name).extend(extra)
        else:
            parser.parse_args(argv)  # prints the usual usage error and exits 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except LLMKitError as e:
        print(f"llmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # unexpected: still one line unless debugging
        if os.environ.get("LLMKIT_DEBUG"):
            raise
        msg = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        print(f"llmkit: error: {type(e).__name__}: {msg} (set LLMKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _set_malloc(mmap_threshold: int, trim_threshold: int | None = None) -> None:
    """glibc's M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) (malloc.h); a no-op elsewhere."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)
        if trim_threshold is not None:
            libc.mallopt(-1, trim_threshold)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def returning_freed_buffers():
    """Process setting for the command line (not the library), around a model load: glibc raises its
    mmap threshold after a large block is freed (up to 32 MiB), so later big temporaries (a checkpoint's
    tensors read before their int4 repacking) come from the heap, and their freed space stays in the
    process. A fixed 1 MiB threshold while loading hands such buffers back to the OS when freed (peak RSS
    of `llmkit generate` on SmolLM2's Q4_1 GGUF: 620-650 MiB -> ~400 MiB); afterwards the process is back
    to `keep_freed_buffers`."""
    _set_malloc(1 << 20)
    try:
        yield
    finally:
        keep_freed_buffers()


def load_model(spec: str, **kw):
    """`llmkit.loading.load_model` for a command: the load runs under `returning_freed_buffers`, so every
    command that loads a model returns the load's temporaries to the OS and then reuses freed buffers."""
    from ..loading import load_model as load

    with returning_freed_buffers():
        return load(spec, **kw)


def keep_freed_buffers() -> None:
    """Every command's steady state (set by `entry`, restored after each load): freed blocks up to 256 MiB
    stay on the heap for the next step. A 1 MiB threshold made every larger temporary ((B, vocab) logits,
    a prefill's dequantized weights, a training step's activations) a fresh mmap, page-faulted in on every
    step and unmapped after: 730k minor faults for 8 sequences x 64 tokens on SmolLM2, and half the
    tokens/s of `llmkit bench train` on the speedrun's fp32 shape (BENCHMARKS.md, pretraining, stop 30)."""
    _set_malloc(256 << 20, 512 << 20)


def entry() -> None:
    keep_freed_buffers()
    sys.exit(main())
