"""Progress bars: tqdm on a terminal, plain rate-limited lines when output is redirected."""

import io
import subprocess
import sys
import textwrap

from tqdm import tqdm

from llmkit.progress import LogProgress, progress_bar


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_lines_every_interval_with_eta_and_postfix():
    clock, out = FakeClock(), io.StringIO()
    bar = LogProgress(total=30, desc="finetune[lora]", unit="step", file=out, interval_s=5.0, clock=clock)
    for step in range(1, 31):
        clock.t += 1.0  # one step a second
        bar.update(1)
        bar.set_postfix(loss=f"{1 / step:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 30 // 5 + 1  # one line per 5 s of 30 s, the last of them again on close
    # after 10 s: 10/30 done at 1 step/s -> 20 s left; the postfix is the one set after step 9
    assert lines[1] == "finetune[lora]: 10/30 (33%) 1 step/s, elapsed 00:10, ETA 00:20, loss=0.111"
    assert lines[-1] == "finetune[lora]: 30/30 (100%) 1 step/s, elapsed 00:30, loss=0.033"


def test_redirected_stderr_gets_bounded_plain_lines(tmp_path):
    # a real redirect: stderr is a file, so not a terminal
    script = textwrap.dedent("""
        import time
        from llmkit.progress import progress_bar
        t0 = time.monotonic()
        bar = progress_bar(200, desc="train", unit="step", interval_s=0.1)
        for i in range(200):
            time.sleep(0.005)
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.write("[step 200] 'a sample'")
        bar.close()
        print(time.monotonic() - t0)
    """)
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        res = subprocess.run([sys.executable, "-c", script], stderr=err, stdout=subprocess.PIPE, text=True,
                             check=True)
    elapsed = float(res.stdout)
    text = log.read_text()
    assert "\r" not in text
    bar_lines = [ln for ln in text.splitlines() if ln.startswith("train: ")]
    assert 2 <= len(bar_lines) <= elapsed / 0.1 + 1
    assert "[step 200] 'a sample'" in text.splitlines()
    assert bar_lines[-1].startswith("train: 200/200 (100%)") and "loss=0.005" in bar_lines[-1]


def test_iterable_and_disabled():
    out = io.StringIO()
    assert list(progress_bar(iterable=range(7), desc="judge", unit="ex", file=out)) == list(range(7))
    assert out.getvalue().startswith("judge: 7/7 (100%)") and out.getvalue().count("\n") == 1
    quiet = io.StringIO()
    bar = progress_bar(5, enabled=False, file=quiet)
    bar.update(5), bar.write("x"), bar.close()
    assert quiet.getvalue() == ""


def test_terminal_gets_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = progress_bar(10, desc="train", file=term)
    assert isinstance(bar, tqdm)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()
