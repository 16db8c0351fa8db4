"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a few
counters, gauges and fixed-bucket histograms need no client library. One `Metrics` per server."""

from __future__ import annotations

import bisect
import threading

# seconds; TTFT spans queueing + prefill, inter-token latency one decode step of the batch
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HELP = {
    "requests": ("counter", "requests accepted into the queue"),
    "rejected": ("counter", "requests refused because the queue was full (HTTP 429)"),
    "errors": ("counter", "requests that ended with an error"),
    "prompt_tokens": ("counter", "prompt tokens of accepted requests"),
    "completion_tokens": ("counter", "tokens generated"),
    "prefix_hit_tokens": ("counter", "prompt tokens whose prefill the prefix cache skipped"),
    "running": ("gauge", "requests holding a row of the batch"),
    "queued": ("gauge", "requests waiting for a row"),
    "ttft_seconds": ("histogram", "time from submission to the first token"),
    "itl_seconds": ("histogram", "time between consecutive tokens of a request"),
}


class Metrics:
    def __init__(self, prefix: str = "llmkit_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self.values: dict[str, float] = {}
        self.hists: dict[str, tuple[list[int], list[float]]] = {}  # name -> (bucket counts, [sum, count])

    def inc(self, name: str, by: float = 1):
        with self._lock:
            self.values[name] = self.values.get(name, 0) + by

    def set(self, name: str, value: float):
        with self._lock:
            self.values[name] = value

    def observe(self, name: str, value: float):
        with self._lock:
            counts, tot = self.hists.setdefault(name, ([0] * (len(BUCKETS) + 1), [0.0, 0]))
            counts[bisect.bisect_left(BUCKETS, value)] += 1
            tot[0] += value
            tot[1] += 1

    def get(self, name: str) -> float:
        return self.values.get(name, 0)

    def render(self) -> str:
        out = []
        with self._lock:
            names = sorted(set(self.values) | set(self.hists) | set(HELP))
            for name in names:
                kind, text = HELP.get(name, ("counter", name.replace("_", " ")))
                full = self.prefix + name + ("_total" if kind == "counter" else "")
                out.append(f"# HELP {full} {text}")
                out.append(f"# TYPE {full} {kind}")
                if kind != "histogram":
                    out.append(f"{full} {self.values.get(name, 0):g}")
                    continue
                counts, (s, c) = self.hists.get(name, ([0] * (len(BUCKETS) + 1), [0.0, 0]))
                cum = 0
                for le, n in zip(list(BUCKETS) + ["+Inf"], counts):
                    cum += n
                    out.append(f'{full}_bucket{{le="{le}"}} {cum}')
                out.append(f"{full}_sum {s:.6f}")
                out.append(f"{full}_count {c}")
        return "\n".join(out) + "\n"
