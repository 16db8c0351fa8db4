"""Atomic file output: write to a temp file beside the target, fsync, rename.

A crash (or a full disk) mid-write leaves the previous file intact, never a half-written one.
The temporaries a killed writer leaves (`.NAME.XXXXXXXX.tmp`, `.NAME.old`) are cleaned by the next
write of NAME (clean_interrupted), and `.NAME.old` (the previous directory, moved aside for the
instant of the swap) is put back when NAME itself is missing.

`--force` deletes only what the command writes: atomic_dir replaces the entries its new output
holds (and those matching `owns`, e.g. a previous run's extra shards) and carries every other entry
of the old directory over (hard links, so a kill at any moment loses nothing). check_overwrite
refuses an output that is the working directory or holds it, and check_output_dir also one that
holds the command's inputs, before any work.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import LLMKitError

# what a model-like output directory (checkpoint, adapter, reward model) may hold: a --force over one
# replaces all of these, so a full checkpoint over an adapter (or a smaller shard set) leaves nothing stale
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "llmkit*.json",
               "adapter_*", "tokenizer*.json", "special_tokens_map.json")


def check_overwrite(path: str | Path, force: bool) -> None:
    """Refuse to replace an existing file or non-empty directory unless force; refuse always an
    output that is the working directory or one of its parents (replacing it cannot be right)."""
    p = Path(path)
    if p.exists():
        r, cwd = p.resolve(), Path.cwd().resolve()
        if r == cwd or r in cwd.parents:
            raise LLMKitError(f"output {path} is the working directory or holds it: name a directory of its own")
    if p.exists() and not force and (p.is_file() or any(p.iterdir())):
        raise LLMKitError(f"{p} already exists (pass --force to overwrite)")


def check_output_dir(path: str | Path, force: bool, inputs=()) -> None:
    """check_overwrite, and refuse an output directory that holds one of the command's `inputs`
    (a --force would replace them; before any work)."""
    check_overwrite(path, force)
    r = Path(path).resolve()
    for i in inputs:
        ri = Path(i).resolve()
        if ri == r or r in ri.parents:
            raise LLMKitError(f"output {path} holds the input {i}: write the output to another directory")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_interrupted(parent: str | Path, name: str = r"[^/]+") -> None:
    """Remove the temporaries killed writers left in `parent` for targets matching the regex `name`
    (`.NAME.XXXXXXXX.tmp` from tempfile, `.NAME.old` from a directory swap); a `.NAME.old` whose
    NAME is missing was cut off mid-swap and is restored instead. One writer per target is assumed
    (the run owns its directory)."""
    d = Path(parent)
    if not d.is_dir():
        return
    tmp_re = re.compile(rf"\.({name})\.[a-z0-9_]{{8}}\.tmp")
    old_re = re.compile(rf"\.({name})\.old")
    for e in d.iterdir():
        if tmp_re.fullmatch(e.name):
            _remove(e)
        elif m := old_re.fullmatch(e.name):
            target = d / m.group(1)
            if target.exists() or target.is_symlink():
                _remove(e)
            else:
                os.replace(e, target)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------ write failures
class WriteError(LLMKitError):
    """Writing an output failed (disk full, read-only, quota...): one line naming the path, the cause and
    the free space; the previous artefact is intact (writes are atomic). `reason` is the cause alone."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"could not write {path}: {reason}")


_WRITE_ERRNOS = (28, 122, 30, 13, 5, 27)  # ENOSPC, EDQUOT, EROFS, EACCES, EIO, EFBIG
# torch's zip writer and safetensors' Rust writer report a failed write as RuntimeError / SafetensorError
_WRITE_MESSAGES = ("file write failed", "PytorchStreamWriter failed", "enforce fail at inline_container",
                   "No space left", "StorageFull", "Disk quota", "Read-only file system", "IoError")


def as_write_error(e: BaseException, path: Path) -> WriteError | None:
    """The WriteError for `e` if it is a failed write, else None (a bug or bad input stays as it is)."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        reason = os.strerror(e.errno)
    elif (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError") and \
            any(m in str(e) for m in _WRITE_MESSAGES):
        reason = os.strerror(28) if any(m in str(e) for m in ("No space", "StorageFull")) \
            else str(e).splitlines()[0][:200]
    else:
        return None
    try:
        free = shutil.disk_usage(next(q for q in (path, *path.parents) if q.exists())).free
        reason += f" ({free / 2**20:,.0f} MiB free there)"
    except (OSError, StopIteration):
        pass
    return WriteError(path, reason)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path to write; on success it replaces `path` atomically, on error it is removed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted(p.parent, re.escape(p.name))
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if (w := as_write_error(e, p)) is not None and w is not e:
            raise w from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _link_tree(src: Path, dst: Path) -> None:
    """dst: the same files as src, by hard links (copies where links are impossible)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False, owns: tuple[str, ...] = ()):
    """Yield a temp directory; on success it replaces directory `path` (old one removed only then).

    Replacing keeps what is not the command's: an entry of the old directory that the new output
    does not hold and that matches none of the glob patterns `owns` (the command's artefacts whose
    names vary, e.g. "train_*.bin"; "*" for a directory that is wholly the command's) is carried
    over into the new one. Carried entries are hard-linked into the temp directory before the swap,
    so at every instant they exist in `path` or in `.NAME.old`, which the next write restores."""
    p = Path(path)
    check_overwrite(p, force)
    if not p.name or p.name in (".", ".."):
        raise LLMKitError(f"output {path} names no directory of its own")
    p.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted(p.parent, re.escape(p.name))
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if p.is_dir() and not p.is_symlink():
            for e in p.iterdir():
                if not (tmp / e.name).exists() and not any(fnmatch.fnmatchcase(e.name, g) for g in owns):
                    _link_tree(e, tmp / e.name)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if p.exists() or p.is_symlink():
            old = p.with_name(f".{p.name}.old")
            _remove(old)
            os.replace(p, old)
            os.replace(tmp, p)
            _remove(old)
        else:
            os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (w := as_write_error(e, p)) is not None and w is not e:
            raise w from None
        raise


# ------------------------------------------------------------------ one writer per output
@contextlib.contextmanager
def output_lock(path: str | Path, enabled: bool = True):
    """Hold an exclusive advisory lock (fcntl.flock) on `.NAME.lock` beside output `path` while a
    command writes it; a second writer is refused with the holder's PID and command line. The lock
    file sits beside the output, not in it, so atomic_dir's swap of the directory cannot take it
    away; it is removed on release. The kernel drops the lock when its holder dies (even SIGKILL),
    so a crashed run never blocks the next. A no-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    p = Path(path).resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    lock = p.parent / f".{p.name}.lock"
    while True:
        f = open(lock, "a+")  # noqa: SIM115  (held open for the whole run: the lock lives on this file)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LLMKitError(f"{path} is being written by another llmkit run (pid {holder}); "
                              f"wait for it to finish or choose another output") from None
        try:  # the holder before us may have removed the file between our open and our lock: retry
            same = os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}: {' '.join(sys.argv) or 'python'}\n")
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter that opened it retries on the new file
        f.close()


def locks_run_dir(fn):
    """Decorator for a recipe `fn(cfg, ...)`: run it holding output_lock(cfg.train.out_dir). Only rank
    0 of a torchrun job locks (the other ranks write no output; RANK is set by torchrun)."""
    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with output_lock(cfg.train.out_dir, enabled=os.environ.get("RANK", "0") == "0"):
            return fn(cfg, *args, **kwargs)
    return wrapper
