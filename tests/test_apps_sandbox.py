"""The sandbox's hostile-program suite: each program is stopped with a clear reason, the test process goes on.

Every case runs a real child process (about 0.1 s each); the time-limit cases use 1-2 s limits."""

import os
import time

import pytest

from llmkit.apps.sandbox import SandboxLimits, run_python, sandbox_capabilities

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="the sandbox needs POSIX")



def run(code, **kw):
    return run_python(code, SandboxLimits(**{"timeout_s": 30, **kw}))  # generous: the CI machine may be busy


def test_ordinary_program_runs_with_allowed_modules():
    r = run("import math, statistics, fractions, decimal, itertools, functools, re, datetime, collections, random\n"
            "from collections import namedtuple\nP = namedtuple('P', 'x y')\n"
            "print(P(1, 2), math.comb(5, 2), statistics.mean([1, 2, 3]), fractions.Fraction(1, 3) * 3)\n"
            "print(datetime.datetime.strptime('2020-01-02', '%Y-%m-%d').year)\n"
            "open('scratch.txt', 'w').write('kept in the work dir')\nprint(open('scratch.txt').read())\n")
    assert r.ok, r.stderr
    assert r.reason == "ok" and r.exit_code == 0 and not r.blocked
    assert r.stdout.splitlines() == ["P(x=1, y=2) 10 2 1", "2020", "kept in the work dir"]


def test_exception_is_reported_with_its_traceback():
    r = run("def f():\n    return 1 / 0\nf()\n")
    assert r.reason == "error" and r.exit_code == 1
    assert "ZeroDivisionError" in r.detail and "line 2" in r.stderr


def test_exit_status_passes_through():
    assert run("raise SystemExit(3)").exit_code == 3
    assert run("raise SystemExit(3)").reason == "exit"


@pytest.mark.parametrize("name,code,expect", [
    ("read /etc/passwd", "print(open('/etc/passwd').read())", "outside the work directory"),
    ("read ~/.ssh", "print(open(__import__('collections')._sys.modules['posix'].environ.get(b'HOME', b'/root')"
     ".decode() + '/.ssh/id_rsa').read())", "outside the work directory"),
    ("write outside", "open('/tmp/llmkit-sandbox-escape.txt', 'w').write('x')", "outside the work directory"),
    ("list /", "import random\nprint(random._os.listdir('/'))", "outside the work directory"),
    ("import os", "import os\nos.system('echo pwned')", "import os"),
    ("import subprocess", "import subprocess\nsubprocess.run(['id'])", "import subprocess"),
    ("import ctypes", "import ctypes", "import ctypes"),
    ("import socket", "import socket\nsocket.create_connection(('1.1.1.1', 80))", "import socket"),
    ("__builtins__ import", "__builtins__['__import__']('os').system('id')", "import os"),
    ("real __import__ via sys.modules", "import collections\n"
     "collections._sys.modules['builtins'].__import__('socket')", "import socket"),
    ("os via a module attribute", "import random\nrandom._os.system('echo pwned')", "os.system"),
    ("fork bomb", "import random\nwhile True:\n    random._os.fork()", "os.fork"),
    ("subclasses escape", "c = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
     "c.__init__.__globals__['system']('id')", "os.system"),
    ("frame escape", "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_back.f_globals)",
     "tb_frame"),
    ("raise own limits", "import collections\nr = collections._sys.modules['resource']\n"
     "r.setrlimit(r.RLIMIT_CPU, (1000, 1000))", "resource.setrlimit"),
])
def test_hostile_program_is_blocked(name, code, expect):
    r = run(code)
    assert r.reason == "blocked", (name, r.summary(), r.stderr[-300:])
    assert expect in r.detail, (name, r.detail)
    assert r.exit_code == 1
    assert "pwned" not in r.stdout and "root:" not in r.stdout
    assert not os.path.exists("/tmp/llmkit-sandbox-escape.txt")


def test_swallowed_violation_is_still_reported():
    r = run("try:\n    open('/etc/passwd')\nexcept PermissionError:\n    print('carried on')\n")
    assert r.reason == "ok" and r.stdout.strip() == "carried on"
    assert r.blocked and "/etc/passwd" in r.blocked[0]


def test_environment_is_empty():
    r = run("import random\nprint(sorted(random._os.environ))")
    assert r.ok and "HOME" not in r.stdout and "PATH" not in r.stdout and "LLMKIT" not in r.stdout


def test_infinite_loop_hits_the_cpu_or_wall_limit():
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout_s=1.5, cpu_s=1)
    assert r.reason in ("cpu", "timeout"), r.summary()
    assert time.monotonic() - t0 < 10


def test_sleeping_program_hits_the_wall_limit():
    r = run("import time\ntime.sleep(60)", timeout_s=1)
    assert r.reason == "timeout" and r.exit_code == -9 and r.wall_s < 5


def test_allocating_10_gb_is_a_memory_error():
    r = run("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert r.reason == "memory" and "allocated" not in r.stdout


def test_huge_output_is_cut_and_stopped():
    r = run("while True:\n    print('x' * 1000)", output_bytes=10_000)
    assert r.reason == "output" and len(r.stdout) <= 10_000


def test_raw_socket_module_is_refused():
    # below `import socket`: the C module through the real __import__ is refused by the audit hook
    r = run("import collections\ncollections._sys.modules['builtins'].__import__('_socket')")
    assert r.reason == "blocked" and "_socket" in r.detail


@pytest.mark.skipif(not sandbox_capabilities()["netns"], reason="unshare --net is not available here")
def test_the_child_runs_in_its_own_network_namespace():
    import os as _os

    # the kernel, not the hook, is the boundary: the child's net namespace differs from ours
    r = run("import random\nprint(random._os.readlink('/proc/self/ns/net'))")
    # readlink is not an audited event: the namespace id comes back and must differ from this process's
    assert r.ok, r.summary()
    assert r.stdout.strip() != _os.readlink("/proc/self/ns/net")


def test_bad_limits_are_a_clear_error():
    from llmkit.errors import LLMKitError

    with pytest.raises(LLMKitError, match="timeout"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(LLMKitError, match="memory"):
        SandboxLimits(memory_mb=1)


def test_cli_sandbox_run(tmp_path, capsys):
    import json

    from llmkit.cli import main

    prog = tmp_path / "p.py"
    prog.write_text("print(6 * 7)\n")
    assert main(["sandbox", "run", str(prog), "--timeout", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stdout"] == "42\n" and out["reason"] == "ok" and out["exit_code"] == 0
    prog.write_text("import socket\n")
    assert main(["sandbox", "run", str(prog), "--timeout", "30"]) == 3
    assert "blocked" in capsys.readouterr().err
    assert main(["sandbox", "run", str(tmp_path / "missing.py")]) == 2
    assert "program not found" in capsys.readouterr().err
