"""Progress bars that suit both a terminal and a log file.

On a terminal, `progress_bar` is tqdm's bar (redrawn in place with a carriage return, with ETA). When
the stream is not a terminal (output redirected to a file, a pipe, CI), carriage-return frames pile up:
a 10-minute speedrun redirected to a file wrote ~240 KB of repeated bars. There it is `LogProgress`,
which prints one plain line at most every `interval_s` seconds, plus a final line on close:

    finetune[lora]: 120/500 (24%) 2.1 step/s, elapsed 0:57, ETA 3:01, loss=1.234

Both answer the part of tqdm's interface llmkit uses: iteration, update, set_postfix, write, close,
`n`, `total`, and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

# A log line at most this often (seconds): ~120 lines for a 10-minute run.
LOG_INTERVAL_S = 5.0


def progress_bar(total: int | None = None, initial: int = 0, enabled: bool = True, desc: str = "train",
                 unit: str = "step", *, iterable: Iterable | None = None, unit_scale: bool = False, file=None,
                 interval_s: float = LOG_INTERVAL_S):
    """A progress bar over `total` units (or over `iterable`) on `file` (default: stderr at call time).

    tqdm's bar when `file` is a terminal; otherwise a `LogProgress` printing a plain line every
    `interval_s` seconds. `enabled=False` prints nothing (e.g. on ranks other than 0)."""
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, disable=not enabled, desc=desc, unit=unit,
                    unit_scale=unit_scale, file=file, dynamic_ncols=True)
    return LogProgress(iterable, total=total, initial=initial, enabled=enabled, desc=desc, unit=unit,
                       unit_scale=unit_scale, file=file, interval_s=interval_s)


class LogProgress:
    """Progress as plain lines for logs: desc, n/total, rate, elapsed, ETA and the postfix, written at
    most every `interval_s` seconds (checked on update/set_postfix) and once more on close."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
                 enabled: bool = True, desc: str = "", unit: str = "it", unit_scale: bool = False, file=None,
                 interval_s: float = LOG_INTERVAL_S, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.initial = iterable, total, initial, initial
        self.disable, self.desc, self.unit, self.unit_scale = not enabled, desc, unit, unit_scale
        self.file = sys.stderr if file is None else file
        self.interval_s, self.clock = interval_s, clock
        self.postfix: dict[str, str] = {}
        self.start_t = self.last_print_t = clock()
        self.closed = False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = {k: str(v) for k, v in kwargs.items()}
        self._maybe_print()

    def write(self, s: str) -> None:
        if not self.disable:
            print(s, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed and not self.disable:
            print(self.line(), file=self.file, flush=True)
        self.closed = True

    def _maybe_print(self) -> None:
        now = self.clock()
        if not self.disable and not self.closed and now - self.last_print_t >= self.interval_s:
            self.last_print_t = now
            print(self.line(now), file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        """One status line: 'desc: n/total (pct%) rate unit/s, elapsed m:ss, ETA m:ss, k=v, ...'."""
        from tqdm import tqdm

        elapsed = (self.clock() if now is None else now) - self.start_t
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        def amount(x: float) -> str:
            return tqdm.format_sizeof(x) if self.unit_scale else f"{x:,}"

        done = amount(self.n) + (f"/{amount(self.total)}" if self.total else "")
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {done}" if self.desc else done]
        if rate:
            parts.append(f"{amount(rate)}{self.unit}/s" if self.unit_scale else f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s")
        fields = [f"elapsed {tqdm.format_interval(elapsed)}"]
        if rate and self.total and self.n < self.total:
            fields.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        fields += [f"{k}={v}" for k, v in self.postfix.items()]
        return " ".join(parts) + ", " + ", ".join(fields)
