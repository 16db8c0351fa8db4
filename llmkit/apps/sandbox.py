"""Run untrusted Python (a model's PAL program, the agent's python tool, `llmkit sandbox run`) in a
separate, limited process, and say how it ended.

What holds the program in, strongest first:
  1. **a separate process**: a crash, hang or MemoryError there never touches the caller; the
     caller kills its whole process group at the wall-clock limit or when output passes its limit;
  2. **kernel limits** (setrlimit, set in the child before the program runs): CPU seconds
     (RLIMIT_CPU -> SIGXCPU), address space (RLIMIT_AS -> MemoryError), processes (RLIMIT_NPROC),
     file size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps;
  3. **namespaces and users, where the system allows**: `unshare --net` gives the child a network
     namespace with only a downed loopback (no route anywhere); when the caller is root the child
     drops to uid/gid 65534 (`nobody`) with no groups, so file permissions apply to it
     (~/.ssh of root is unreadable) and RLIMIT_NPROC is enforced (root ignores it);
  4. **an empty environment** (no variables), `python -I -S -u` (no user site, no PYTHON* variables,
     no site-packages), stdin from /dev/null, a fresh temporary working directory deleted afterwards;
  5. **an audit hook** (PEP 578, `sys.addaudithook`) installed before the program: only a short
     list of audit events passes (exec, compile, import of allow-listed modules, open/listdir
     inside the work directory, time.sleep); fork/exec/spawn/system, sockets, ctypes, setrlimit,
     signals to other processes, file operations outside the work directory, frame and
     `__globals__` access (the `().__class__.__base__.__subclasses__()` escapes) are refused and
     reported; the program's own `import` only admits the allow-listed modules.

What it does NOT guarantee: the audit hook and the import allow-list run inside the same
interpreter as the hostile code, so they are tripwires, not a security boundary -- CPython's own
documentation says audit hooks cannot stop a determined attacker (a memory-corruption bug in
CPython or an unaudited code path defeats them). The boundary is what the kernel enforces: the
separate process, its rlimits, and -- only where available -- the network namespace and the
unprivileged user. Without `unshare` or without root, a program that gets past the hook could
reach the network and the caller's files with the caller's rights; run untrusted code on a machine
(or container) you can lose. `sandbox_capabilities()` says which layers are active here.

Shapes of the result: `SandboxResult(stdout, stderr, exit_code, reason, detail, blocked, wall_s, cpu_s)`
where `reason` is one of REASONS.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import LLMKitError

# Modules a sandboxed program may import: pure computation, no I/O beyond what the hook allows.
DEFAULT_MODULES = ("math", "cmath", "statistics", "fractions", "decimal", "numbers", "itertools", "functools",
                   "operator", "re", "string", "datetime", "calendar", "collections", "heapq", "bisect",
                   "random", "time", "json", "copy", "dataclasses", "typing", "enum", "textwrap", "array")

REASONS = {
    "ok": "finished normally",
    "error": "the program raised an exception",
    "exit": "the program called exit with a non-zero status",
    "blocked": "the program tried something the sandbox forbids",
    "timeout": "wall-clock time limit",
    "cpu": "CPU time limit",
    "memory": "memory limit",
    "output": "output size limit",
    "killed": "killed by a signal",
}


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int | None = None  # CPU seconds; None: ceil(timeout_s)
    memory_mb: int = 512  # address space (RLIMIT_AS); Python itself needs ~30 MB
    output_bytes: int = 64_000  # stdout + stderr together
    file_mb: int = 16  # largest file the program may write in its work directory
    modules: tuple[str, ...] = DEFAULT_MODULES

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise LLMKitError(f"sandbox timeout must be > 0 seconds, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise LLMKitError(f"sandbox memory limit must be >= 64 MB (Python needs ~30 MB), got {self.memory_mb}")
        if self.output_bytes < 1:
            raise LLMKitError(f"sandbox output limit must be >= 1 byte, got {self.output_bytes}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # the process's exit status; negative: killed by that signal
    reason: str  # a key of REASONS
    detail: str = ""  # one line: what was blocked, which exception, which limit
    blocked: list[str] = field(default_factory=list)  # every refused operation, in order
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    def summary(self) -> str:
        s = f"{self.reason}: {REASONS[self.reason]}"
        return s + (f" ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "summary": self.summary()}


@lru_cache(maxsize=1)
def sandbox_capabilities() -> dict:
    """Which optional layers work on this machine: {"netns": [...prefix] | None, "drop_user": bool}."""
    prefix = None
    exe = shutil.which("unshare")
    if exe and sys.platform.startswith("linux"):
        for cand in ([exe, "--net"], [exe, "--map-root-user", "--net"]):
            try:
                r = subprocess.run(cand + ["true"], capture_output=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                prefix = cand
                break
    # dropping to nobody needs real root, and is pointless inside a --map-root-user namespace
    drop = hasattr(os, "geteuid") and os.geteuid() == 0 and (prefix is None or "--map-root-user" not in prefix)
    return {"netns": prefix, "drop_user": drop}


def _child_source() -> str:
    return (Path(__file__).with_name("_sandbox_child.py")).read_text(encoding="utf-8")


def run_python(code: str, limits: SandboxLimits | None = None, files: dict[str, str] | None = None) -> SandboxResult:
    """Run `code` (Python source) in the sandbox; `files` are extra text files put in its work directory.
    Never raises for anything the program does; LLMKitError only if the sandbox itself cannot start."""
    limits = limits or SandboxLimits()
    caps = sandbox_capabilities()
    cpu = limits.cpu_s if limits.cpu_s is not None else max(1, int(-(-limits.timeout_s // 1)))
    workdir = tempfile.mkdtemp(prefix="llmkit-sandbox-")
    try:
        os.chmod(workdir, 0o700)
        for name, text in {**(files or {}), "main.py": code}.items():
            p = Path(workdir) / name
            if p.resolve().parent != Path(workdir).resolve():
                raise LLMKitError(f"sandbox file name {name!r} must be a plain file name")
            p.write_text(text, encoding="utf-8")
            os.chmod(p, 0o644)
        cfg = {"cpu_s": cpu, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
               "modules": list(limits.modules), "drop_to": 65534 if caps["drop_user"] else None}
        r_status, w_status = os.pipe()
        argv = (caps["netns"] or []) + [sys.executable, "-I", "-S", "-u", "-c", _child_source(), workdir, str(w_status),
                                        json.dumps(cfg)]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, cwd=workdir, pass_fds=(w_status,), start_new_session=True)
        except OSError as e:
            os.close(r_status)
            os.close(w_status)
            raise LLMKitError(f"cannot start the sandbox process: {e}") from None
        os.close(w_status)
        return _supervise(proc, r_status, limits, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: anything it managed to start dies too
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(proc, r_status: int, limits: SandboxLimits, t0: float) -> SandboxResult:
    """Read stdout, stderr and the status pipe until the child ends or a limit is hit."""
    sel = selectors.DefaultSelector()
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(r_status, selectors.EVENT_READ, "status")
    stopped = None
    deadline = t0 + limits.timeout_s
    open_streams = 3
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            stopped = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            bufs[key.data] += chunk
        if len(bufs["stdout"]) + len(bufs["stderr"]) > limits.output_bytes:
            stopped = "output"
            break
    if stopped:
        _kill(proc)
    sel.close()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu_s = usage.ru_utime + usage.ru_stime
    except ChildProcessError:
        proc.wait()
        cpu_s = 0.0
    wall = time.monotonic() - t0
    # drain what the status pipe still holds (blocked events written just before a kill)
    try:
        os.set_blocking(r_status, False)
        while True:
            chunk = os.read(r_status, 65536)
            if not chunk:
                break
            bufs["status"] += chunk
    except (BlockingIOError, OSError):
        pass
    os.close(r_status)
    for s in (proc.stdout, proc.stderr):
        s.close()
    events = []
    for line in bufs["status"].decode("utf-8", "replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    blocked = [e["blocked"] for e in events if isinstance(e, dict) and "blocked" in e]
    final = next((e for e in reversed(events) if isinstance(e, dict) and "status" in e), None)
    code = proc.returncode
    cap = limits.output_bytes
    out = bytes(bufs["stdout"][:cap]).decode("utf-8", "replace")
    err = bytes(bufs["stderr"][:max(0, cap - len(bufs["stdout"]))]).decode("utf-8", "replace")
    reason, detail = _classify(stopped, final, code, blocked, cpu_s, limits, err)
    return SandboxResult(out, err, code, reason, detail, blocked, round(wall, 3), round(cpu_s, 3))


def _classify(stopped, final, code, blocked, cpu_s, limits, err) -> tuple[str, str]:
    if stopped == "timeout":
        return "timeout", f"stopped after {limits.timeout_s:g} s wall clock"
    if stopped == "output":
        return "output", f"more than {limits.output_bytes} bytes of output"
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= (limits.cpu_s or limits.timeout_s) - 0.05):
            return "cpu", f"used {cpu_s:.1f} s of CPU"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return "killed", f"signal {name}"
    if final and final.get("status") == "memory":
        return "memory", f"address space limited to {limits.memory_mb} MB"
    if final and final.get("status") == "error":
        last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), final.get("type", ""))
        if blocked and ("PermissionError" in last or "ImportError" in last or "ValueError" in last
                        or final.get("type") in ("SandboxViolation", "ImportError")):
            return "blocked", blocked[0]
        return "error", last.strip()
    if final and final.get("status") == "exit" and final.get("code"):
        if blocked:
            return "blocked", blocked[0]
        return "exit", f"exit status {final['code']}"
    if final is None:  # ended without reporting: crashed in a way it could not tell
        if blocked:
            return "blocked", blocked[0]
        return "killed", f"exit status {code} without a report"
    return "ok", ("caught and went on past: " + blocked[0]) if blocked else ""
