"""The sandbox child's start-up code (run as `python -I -S -c <this file's text> ARGS`, never imported).

Order matters: everything that needs privileges or modules the user may not have happens first,
then the audit hook goes in, then the user's program runs in fresh globals whose `__import__`
only admits the allow-listed modules.

  1. pre-import the allow-listed modules (so their own imports of os, sys, ... are already done);
  2. if started as root: give the work directory to `nobody` and drop to uid/gid 65534 with no
     supplementary groups (then the kernel's file permissions and RLIMIT_NPROC apply);
  3. set the rlimits: CPU seconds, address space, process count, file size, open files, no core;
  4. install the audit hook (PEP 578): it allows only a short list of events, checks `open` paths
     (inside the work directory only) and `import` names (allow-list), and refuses everything else
     (fork/exec/spawn/system, sockets, ctypes, setrlimit, frame and __globals__ access, ...);
  5. exec the program with stdout/stderr going to the parent's pipes; report how it ended on a
     status pipe as one JSON line: {"status": "ok" | "error" | "memory" | "exit", ...}; blocked
     events are reported on the same pipe the moment they happen.

Argv: workdir, status fd, JSON {"cpu_s", "memory_mb", "file_mb", "modules", "drop_to"}.
"""


def _main():
    import json
    import os
    import sys

    workdir, status_fd, cfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    write = os.write

    def report(obj):
        try:
            write(status_fd, (json.dumps(obj) + "\n").encode())
        except OSError:
            pass

    allowed = frozenset(cfg["modules"])
    # modules the allow-listed ones import lazily from inside their functions
    helpers = ("_strptime", "_pydecimal", "_datetime", "_decimal", "_random", "_statistics", "_heapq",
               "_bisect", "_functools", "_collections", "_operator", "_sre", "copy", "numbers", "enum",
               "unicodedata", "string", "heapq", "bisect", "operator", "keyword", "reprlib", "weakref",
               "types", "contextvars", "locale", "calendar", "hashlib", "struct", "_struct", "base64",
               "textwrap", "dataclasses", "inspect", "cmath", "array", "typing", "abc")
    for name in sorted(allowed) + list(helpers):
        try:
            __import__(name)
        except ImportError:
            pass

    import resource

    if cfg.get("drop_to") is not None:  # root: become nobody, so file permissions and NPROC hold
        uid = int(cfg["drop_to"])
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    cpu = int(cfg["cpu_s"])
    mem = int(cfg["memory_mb"]) << 20
    fsize = int(cfg["file_mb"]) << 20
    for lim, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                            (resource.RLIMIT_NPROC, 1, 1), (resource.RLIMIT_FSIZE, fsize, fsize),
                            (resource.RLIMIT_NOFILE, 32, 32), (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(lim, (soft, hard))
    os.chdir(workdir)
    root = os.path.realpath(workdir)
    realpath, fspath = os.path.realpath, os.fspath

    # Events that ordinary allow-listed code raises; anything not here is refused.
    ok_events = frozenset({"exec", "compile", "time.sleep", "builtins.id", "sys._getframe", "open", "import",
                           "os.listdir", "os.scandir", "cpython._PySys_ClearAuditHooks"})

    class SandboxViolation(PermissionError):
        pass

    def hook(event, args):
        if event in ok_events:
            if event == "open":
                path = args[0]
                if isinstance(path, int):
                    reason = "opening a file descriptor by number"
                else:
                    full = realpath(fspath(path))
                    if full == root or full.startswith(root + os.sep):
                        return
                    reason = f"open {fspath(path)!r}: outside the work directory"
            elif event in ("os.listdir", "os.scandir"):
                p = args[0]
                full = realpath(fspath(p if p is not None else "."))
                if full == root or full.startswith(root + os.sep):
                    return
                reason = f"{event} {fspath(p)!r}: outside the work directory"
            elif event == "import":
                top = args[0].split(".")[0]
                if top in allowed or args[0] in helpers:
                    return
                reason = f"import {args[0]}: not an allowed module"
            elif event == "sys._getframe":
                # frames lead to f_back and the globals of this start-up code; namedtuple() asks for
                # one inside `try: ... except ValueError`, so a ValueError keeps it working
                raise ValueError("sandbox: frames are not available")
            else:
                return
        else:
            detail = ""
            if event == "object.__getattr__" and len(args) > 1:
                detail = f" .{args[1]}"
            reason = f"{event}{detail}: not allowed in the sandbox"
        report({"blocked": reason})
        raise SandboxViolation("sandbox: " + reason)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0:
            raise ImportError("sandbox: relative imports are not allowed")
        if name.split(".")[0] not in allowed and name not in helpers:
            report({"blocked": f"import {name}: not an allowed module"})
            raise ImportError(f"sandbox: import of {name!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
        return __import__(name, globals, locals, fromlist, level)

    import builtins

    safe = dict(builtins.__dict__)
    safe["__import__"] = guarded_import
    for name in ("breakpoint", "input", "help", "exit", "quit", "copyright", "credits", "license"):
        safe.pop(name, None)
    path = os.path.join(root, "main.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    user_globals = {"__name__": "__main__", "__builtins__": safe, "__file__": "main.py"}
    excepthook, exit_now, flush = sys.__excepthook__, os._exit, sys.stdout.flush
    err_flush = sys.stderr.flush
    del source, f, builtins, cfg
    sys.addaudithook(hook)
    status = 0
    try:
        exec(code, user_globals)
        report({"status": "ok"})
    except MemoryError:
        report({"status": "memory"})
        try:
            sys.stderr.write("MemoryError: the program ran out of its memory limit\n")
        except BaseException:
            pass
        status = 1
    except SystemExit as e:
        c = e.code
        status = c if isinstance(c, int) and not isinstance(c, bool) else (0 if c is None else 1)
        report({"status": "exit", "code": status})
    except BaseException as e:  # noqa: BLE001 - the user's error, printed as Python would
        report({"status": "error", "type": type(e).__name__})
        try:
            tb = e.__traceback__.tb_next  # drop this start-up frame from the report
            e.__traceback__ = tb
            excepthook(type(e), e, tb)
        except BaseException:
            pass
        status = 1
    for fl in (flush, err_flush):
        try:
            fl()
        except BaseException:
            pass
    exit_now(status & 0xFF)  # no finalizers, atexit or __del__ of user objects after this point


_main()
