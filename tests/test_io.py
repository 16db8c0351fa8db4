"""Output safety (issue 21 item 4): `--force` deletes only what the command writes, an output that is the
working directory or holds the command's inputs is refused before any work, and no `.NAME.old` /
`.NAME.*.tmp` survives (a killed writer's are cleaned, or restored, at the next write)."""

import os
import re
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.io import atomic_dir, atomic_write_text, check_output_dir
from llmkit.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "llmkit" / "data" / "tinyshakespeare.txt").read_text()[:20_000]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".tmp", ".old")))


def test_tokenizer_force_refuses_an_out_that_holds_the_input_or_is_the_cwd(tmp_path, capsys, monkeypatch):
    w = tmp_path / "W"
    w.mkdir()
    (w / "corpus.txt").write_text(TEXT)
    rc, _, err = run_cli(capsys, "tokenizer", "train", "--input", w / "corpus.txt", "--out", w,
                         "--vocab-size", 300, "--force")
    assert rc == 2 and err.count("\n") == 1 and "holds the input" in err and "llmkit: error:" in err
    assert (w / "corpus.txt").read_text() == TEXT  # the input survives
    monkeypatch.chdir(w)
    (tmp_path / "elsewhere.txt").write_text(TEXT)
    rc, _, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "elsewhere.txt", "--out", ".",
                         "--vocab-size", 300, "--force")
    assert rc == 2 and err.count("\n") == 1 and "working directory" in err
    rc, _, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "elsewhere.txt", "--out", tmp_path,
                         "--vocab-size", 300, "--force")  # a parent of the working directory
    assert rc == 2 and "working directory" in err
    assert sorted(p.name for p in w.iterdir()) == ["corpus.txt"]

    # a legitimate --force over a previous tokenizer: replaced, a user's notes kept, nothing left behind
    out = tmp_path / "tok"
    assert run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "elsewhere.txt", "--out", out,
                   "--vocab-size", 300)[0] == 0
    (out / "NOTES.md").write_text("mine")
    assert run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "elsewhere.txt", "--out", out,
                   "--vocab-size", 280, "--force")[0] == 0
    assert (out / "NOTES.md").read_text() == "mine" and (out / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == [] and leftovers(out) == []


def test_data_prepare_refuses_an_out_that_holds_the_input(tmp_path):
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.data import prepare

    (tmp_path / "a.txt").write_text(TEXT)
    tok = Tokenizer.train([tmp_path / "a.txt"], 280)
    with pytest.raises(LLMKitError, match="holds the input"):
        prepare([tmp_path / "a.txt"], tok, tmp_path, force=True, progress=False)
    assert (tmp_path / "a.txt").read_text() == TEXT
    # --force over a larger previous run: its extra shards go (they are the command's), other files stay
    out = tmp_path / "d"
    prepare([tmp_path / "a.txt"], tok, out, shard_tokens=1000, progress=False)
    assert (out / "train_000003.bin").exists()
    (out / "README.txt").write_text("mine")
    prepare([tmp_path / "a.txt"], tok, out, shard_tokens=10**6, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "manifest.json", "tokenizer", "train_000000.bin"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_foreign_entries_replaces_owned_and_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "shard_9.bin").write_text("stale")
    (out / "user").mkdir()
    (out / "user" / "x").write_text("keep")
    with pytest.raises(LLMKitError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, force=True, owns=("shard_*.bin",)) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "shard_0.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "shard_0.bin", "user"]
    assert (out / "a.txt").read_text() == "new a" and (out / "user" / "x").read_text() == "keep"
    with pytest.raises(RuntimeError):  # a failed write leaves the previous directory as it was
        with atomic_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "new a" and leftovers(tmp_path) == []
    # --force over a file (once left .f.old behind)
    (tmp_path / "f").write_text("a file")
    with atomic_dir(tmp_path / "f", force=True) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "f" / "x").is_file() and leftovers(tmp_path) == []
    check_output_dir(tmp_path / "new", False, [tmp_path / "f"])  # a new directory beside the input: fine
    with pytest.raises(LLMKitError, match="names no directory"):
        with atomic_dir(tmp_path / "..", force=True):
            pass


def test_interrupted_writes_are_cleaned_or_restored_at_the_next_write(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / ".out.abcd1234.tmp").mkdir()  # a directory write killed before its swap
    (d / ".notes.txt.k9x_2b7q.tmp").write_text("half")  # a file write killed before its rename
    (d / ".keep.txt.abcd1234.tmp").write_text("another target's temporary: not touched")
    (d / ".out.old").mkdir()  # killed mid-swap: OUT missing, its previous version aside
    (d / ".out.old" / "model.bin").write_text("previous")
    with atomic_dir(d / "out", force=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in (d / "out").iterdir()) == ["model.bin", "new.bin"]  # restored, then carried
    atomic_write_text(d / "notes.txt", "ok")
    assert sorted(p.name for p in d.iterdir()) == [".keep.txt.abcd1234.tmp", "notes.txt", "out"]

    # step checkpoints: a killed save's .step_*.tmp goes at the next save and at --resume
    root = tmp_path / "ckpts"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_train_state(root, 2, model, opt, {}, {})
    (root / ".step_00000004.x1y2z3w4.tmp").mkdir()
    (root / ".step_00000002.old").mkdir()  # step_00000002 exists: the stale copy goes
    assert ckpt.resume_checkpoint(True, root).name == "step_00000002"
    assert sorted(os.listdir(root)) == ["step_00000002"]
    (root / ".step_00000004.x1y2z3w4.tmp").mkdir()
    ckpt.save_train_state(root, 6, model, opt, {}, {})
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000006"]


def test_one_writer_per_output(tmp_path, capsys):
    """A second writer of an output is refused with the holder's PID and command; the lock goes with its
    holder (released on exit, dropped by the kernel when the holder is killed), leaving no file."""
    import signal
    import subprocess
    import sys

    from llmkit.config import load_config
    from llmkit.io import output_lock
    from llmkit.recipes.finetune import FinetuneConfig, finetune
    from llmkit.recipes.pretrain import PretrainConfig, pretrain

    out = tmp_path / "run"
    (tmp_path / "c.txt").write_text(TEXT)
    with output_lock(out):
        with pytest.raises(LLMKitError, match=rf"being written by another llmkit run \(pid {os.getpid()}: "):
            with output_lock(out):
                pass
        with pytest.raises(LLMKitError, match=f"pid {os.getpid()}"):  # checked before any work
            pretrain(load_config(PretrainConfig, None, [f"train.out_dir={out}"]))
        with pytest.raises(LLMKitError, match=f"pid {os.getpid()}"):
            finetune(load_config(FinetuneConfig, None, [f"train.out_dir={out}"]))
        rc, _, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "c.txt", "--out", out,
                             "--vocab-size", 280)
        assert rc == 2 and f"pid {os.getpid()}" in err and err.count("\n") == 1
    assert leftovers(tmp_path) == [] and not (tmp_path / ".run.lock").exists()

    # a holder killed with SIGKILL: its lock is gone with it
    code = f"from llmkit.io import output_lock\nwith output_lock({str(out)!r}):\n    print('held', flush=True)\n    " \
           "import time; time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LLMKitError, match=f"pid {holder.pid}"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(out):  # the stale .run.lock file is reused, not a blocker
        pass
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64; file write failed"),
    OSError(30, "Read-only file system"),
])
def test_any_failed_write_is_one_line_naming_the_path(tmp_path, failure):
    """Disk full through torch's zip writer, safetensors or plain I/O: a WriteError naming the path and
    the free space, the previous output intact and no temp files left."""
    from llmkit.io import WriteError, atomic_dir, atomic_write_text

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(WriteError, match=rf"could not write {re.escape(str(out))}: .*MiB free there"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise failure
    assert (out / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(WriteError):
        with atomic_path_raising(tmp_path / "f.txt", failure):
            pass
    with pytest.raises(RuntimeError, match="a bug"):  # not a write failure: left as it is
        with atomic_dir(out, force=True):
            raise RuntimeError("a bug")


def atomic_path_raising(path, failure):
    import contextlib

    from llmkit.io import atomic_path

    @contextlib.contextmanager
    def cm():
        with atomic_path(path):
            raise failure
        yield
    return cm()


def test_safetensors_write_failure_is_a_write_error(tmp_path):
    from safetensors import SafetensorError

    from llmkit.io import WriteError, as_write_error

    e = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
    w = as_write_error(e, tmp_path)
    assert isinstance(w, WriteError) and "No space left on device" in str(w)
