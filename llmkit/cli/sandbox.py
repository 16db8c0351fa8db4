"""`llmkit sandbox run FILE.py`: run a Python program in the sandbox PAL and the agent use, and say how it ended.

Exit status: the program's own (0 when it finished normally), 3 when a limit or the policy stopped it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("sandbox", help="run untrusted Python with limits (the sandbox of PAL and the agent)",
                       description="Runs the program in a separate process with CPU, wall-clock, memory, process "
                       "and output limits, no network, an empty environment, a throw-away work directory and "
                       "only allow-listed modules (see llmkit/apps/sandbox.py for what is and is not guaranteed).")
    ssub = p.add_subparsers(dest="sandbox_command", metavar="COMMAND")
    r = ssub.add_parser("run", help="run FILE.py and report stdout, stderr, exit status and why it stopped")
    r.add_argument("file", help="the Python program ('-' reads stdin)")
    r.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds (default 10; CPU seconds the same)")
    r.add_argument("--memory-mb", type=int, default=512, help="address-space limit in MB (default 512)")
    r.add_argument("--max-output", type=int, default=64_000, help="bytes of stdout + stderr (default 64000)")
    r.add_argument("--allow", default="", help="extra modules to allow, comma-separated")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=run)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run(args) -> int:
    from ..apps.sandbox import DEFAULT_MODULES, SandboxLimits, run_python
    from ..errors import LLMKitError

    if args.file == "-":
        code = sys.stdin.read()
    else:
        f = Path(args.file)
        if not f.is_file():
            raise LLMKitError(f"program not found: {f}")
        try:
            code = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LLMKitError(f"cannot read {f}: {e}") from None
    extra = tuple(m.strip() for m in args.allow.split(",") if m.strip())
    res = run_python(code, SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb,
                                         output_bytes=args.max_output, modules=DEFAULT_MODULES + extra))
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        print(f"[sandbox] {res.summary()}; exit status {res.exit_code}; {res.wall_s:.2f} s wall, "
              f"{res.cpu_s:.2f} s CPU", file=sys.stderr)
        for b in res.blocked[1:]:
            print(f"[sandbox] also blocked: {b}", file=sys.stderr)
    if res.reason in ("ok", "error", "exit"):
        return res.exit_code if res.exit_code is not None and res.exit_code >= 0 else 1
    return 3
