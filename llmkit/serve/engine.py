"""The serving engine: continuous batching (iteration-level scheduling, Orca, Yu et al. 2022) over a
pool of rows of one pre-allocated `BatchKVCache`. It deals in token ids only; text lives in api.py.

One background thread runs `step()` in a loop. Each step:
  1. admits waiting requests into free rows (the lowest free row first, so live rows stay packed);
  2. drops cancelled requests, freeing their rows at once;
  3. prefills up to `prefill_chunk` prompt tokens in one forward (Sarathi-style chunked prefill,
     Agrawal et al. 2024, so a long prompt does not stall the others): the oldest prompt still
     prefilling and the prefilling rows next to it, each from its own position, right-padded to one
     chunk length, so a burst of new requests (admitted into adjacent rows) prefills together instead
     of one prompt per step;
  4. samples one token for every row that has fresh logits, each with its own `SamplingParams`,
     generator (seed), penalty history and stop conditions; greedy rows without penalties take one
     argmax over the stacked (B, V) logits; finished requests free their rows;
  5. runs one batched decode forward for the rows still going, each at its own position.

Rows of different lengths need no padding mask (see BatchKVCache): a query at position i sees slots
<= i of its own row only. Rows that are free or still prefilling sit inside the decode forward's row
range with a dummy token at their next free position, which their own next write overwrites; to keep
that waste small, the top live row moves into a free lower row when one opens (`_compact`).

Stop strings are checked on the decoded tail of a row's output only (`_tail_hit`), not by decoding
the whole output again every token.

Greedy output of a request equals `llmkit generate` on the same prompt whatever else is in the batch:
the same prefill/decode_step functions, the same sampling processors, the same stop rules. (With
quantized weights a forward of more than `llmkit.quant.SMALL_M` rows takes the weights' dense copy, whose
rounding differs from the few-row kernel's, so an answer can then flip at a near-tie.)

Requests talk to the engine through `submit` (any thread) and their `emit` callback, which the
engine thread calls with each `Event`; the API wraps it into an asyncio queue.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LLMKitError
from ..inference.generate import _stop_string_hit, decode_step, prefill
from ..inference.prefix import PrefixCache
from ..inference.sampling import History, SamplingParams, make_generator, process_logits, sample
from .metrics import Metrics


class QueueFull(LLMKitError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


class EngineClosed(LLMKitError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    token: int | None  # None on a final event that adds no token (stop id, cancel, error)
    logprob: float = 0.0  # log p(token) under the raw model distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # top alternatives (params.logprobs of them)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams  # n == 1: the API submits one request per sample
    emit: Callable[[Event], None]
    id: int = -1
    cancelled: bool = False
    t_submit: float = 0.0


@dataclass
class _Slot:
    """A request holding a row of the cache."""
    req: Request
    row: int
    todo: list[int]  # prompt tokens not yet prefilled
    pos: int  # next position to write in this row
    max_new: int
    gen: torch.Generator
    history: History
    out: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (1, V) next-token logits waiting to be sampled
    t_last: float = 0.0


class Engine:
    def __init__(self, model, *, max_batch: int = 16, max_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache: int = 0, detok: Callable[[list[int]], str] | None = None,
                 metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise LLMKitError(f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0, got {max_batch}, "
                              f"{prefill_chunk}, {max_queue}")
        self.model = model
        self.max_len = min(max_len or model.max_tokens, model.max_tokens)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.detok = detok  # ids -> text, only for stop strings
        # one pool of rows for the server's life; zeros are not touched until written (lazy pages)
        self.cache = model.new_cache(max_batch, self.max_len)
        self.prefix = PrefixCache(max_entries=prefix_cache) if prefix_cache else None
        self.metrics = metrics or Metrics()
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the caller's side (any thread)
    def submit(self, req: Request) -> Request:
        p = req.params
        if p.n != 1:
            raise LLMKitError("the engine takes one sample per request (n=1)")
        if p.stop and self.detok is None:
            raise LLMKitError("stop strings need a tokenizer")
        if not req.prompt:
            raise LLMKitError("empty prompt: give at least one token")
        V = self.model.cfg.vocab_size
        if any(not 0 <= t < V for t in req.prompt):
            raise LLMKitError(f"a prompt token id is outside the model's vocabulary (size {V})")
        if len(req.prompt) + max(p.max_new_tokens, 1) > self.max_len:
            raise LLMKitError(f"prompt of {len(req.prompt)} tokens + {p.max_new_tokens} new tokens is longer than "
                              f"the server's context of {self.max_len} tokens")
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.inc("rejected")
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            req.id = next(self._ids)
            req.t_submit = time.perf_counter()
            self.waiting.append(req)
            self.metrics.inc("requests")
            self.metrics.inc("prompt_tokens", len(req.prompt))
            self._lock.notify()
        return req

    def cancel(self, req: Request):
        """Stop a request (a client went away); its row is freed at the next step boundary."""
        req.cancelled = True
        with self._lock:
            self._lock.notify()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None):
        """Take no new requests; with drain, finish the queued and running ones first; then stop."""
        with self._lock:
            self._closing = True
            if not drain:
                for r in self.waiting:
                    r.cancelled = True
                for s in self.slots:
                    if s is not None:
                        s.req.cancelled = True
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the engine thread
    def _loop(self):
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self.waiting and not self.running and not self._stop:
                        self._lock.wait()
                    if self._stop and not self.waiting and not self.running:
                        return
                try:
                    self.step()
                except Exception:  # a bug in the loop itself: fail the rows, keep serving
                    err = traceback.format_exc(limit=3)
                    for s in list(self.slots):
                        if s is not None:
                            self._finish(s, Event(None, finish_reason="error", error=err))

    def step(self):
        """One scheduling iteration (see the module docstring)."""
        self._admit()
        for s in self.slots:
            if s is not None and s.req.cancelled:
                self._finish(s, Event(None, finish_reason="cancelled"))
        self._compact()
        self._prefill_chunk()
        going = []
        ready = [s for s in self.slots if s is not None and s.logits is not None]
        if ready:
            toks, logp = self._pick(ready)
            for i, s in enumerate(ready):
                tok = self._guard(s, self._sample, s, toks[i], logp[i])
                if tok is not None:
                    going.append((s, tok))
        if going:
            self._decode(going)
        self.metrics.set("running", self.running)
        self.metrics.set("queued", self.queued)

    def _guard(self, s: _Slot, fn, *args):
        """Run per-request work; an exception ends that request only."""
        try:
            return fn(*args)
        except Exception as e:
            self.metrics.inc("errors")
            self._finish(s, Event(None, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            return None

    def _admit(self):
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:  # gone before they got a row: free the queue
                self.waiting.remove(req)
                req.emit(Event(None, finish_reason="cancelled"))
            while self.waiting and None in self.slots:
                req = self.waiting.popleft()
                if req.cancelled:
                    req.emit(Event(None, finish_reason="cancelled"))
                    continue
                row = self.slots.index(None)
                p = req.params
                s = _Slot(req, row, list(req.prompt), 0, min(p.max_new_tokens, self.max_len - len(req.prompt)),
                          make_generator(p.seed), History.start([req.prompt], self.model.cfg.vocab_size, p))
                self.slots[row] = s
                if self.prefix is not None:  # a shared system prompt: reuse its K/V
                    start = self._guard(s, self.prefix.load, self.model, req.prompt, self.cache.rows(row, row + 1))
                    if start:
                        s.todo, s.pos = s.todo[start:], start
                        self.metrics.inc("prefix_hit_tokens", start)

    def _compact(self):
        """Move the top live row into the lowest free row below it: the decode forward covers rows
        0..top, so holes cost compute."""
        while True:
            live = [i for i, s in enumerate(self.slots) if s is not None]
            free = [i for i, s in enumerate(self.slots) if s is None]
            if not live or not free or free[0] > live[-1]:
                return
            src, dst = live[-1], free[0]
            s = self.slots[src]
            self.cache.move_row(src, dst, self.cache.offset + s.pos)
            s.row, self.slots[dst], self.slots[src] = dst, s, None

    def _prefill_chunk(self):
        """One prefill forward over a run of adjacent prefilling rows lo..hi (the oldest prompt's row
        and its prefilling neighbours; at most prefill_chunk rows), T = prefill_chunk // rows tokens
        each (fewer if no row has that many left): ids (B, T) right-padded with token 0, row b at its
        own positions pos_b..pos_b+T-1. Padding K/V lands in slots past a row's real tokens, which no
        query of that row reads before the row's own next write replaces it (as in `_decode`)."""
        todo = [s for s in self.slots if s is not None and s.todo]
        if not todo:
            return
        by_row = {s.row: s for s in todo}
        lo = hi = min(todo, key=lambda s: s.req.id).row
        while hi - lo + 1 < self.prefill_chunk and (lo - 1 in by_row or hi + 1 in by_row):
            if lo - 1 in by_row:
                lo -= 1
            else:
                hi += 1
        group = [by_row[r] for r in range(lo, hi + 1)]
        B = len(group)
        T = min(max(len(s.todo) for s in group), max(1, self.prefill_chunk // B),
                self.max_len - max(s.pos for s in group))  # padding stays inside the rows' slots
        n = [min(len(s.todo), T) for s in group]
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(group):
            ids[b, :n[b]] = torch.tensor(s.todo[:n[b]])
        start = torch.tensor([s.pos for s in group])
        cache = self.cache.rows(lo, hi + 1)
        try:
            if B == 1:  # one prompt: the plain shared-position path, exactly as `generate` runs it
                logits = prefill(self.model, ids, cache, start=group[0].pos)  # (1, V)
            else:
                logits = prefill(self.model, ids, cache, start=start, last_index=torch.tensor(n) - 1)  # (B, V)
        except Exception as e:  # the forward itself failed: these rows cannot go on
            for s in group:
                self.metrics.inc("errors")
                self._finish(s, Event(None, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            return
        for b, s in enumerate(group):
            s.todo, s.pos = s.todo[n[b]:], s.pos + n[b]
            if not s.todo:
                s.logits = logits[b:b + 1]
                if self.prefix is not None:
                    self._guard(s, self.prefix.store, self.model, s.req.prompt, self.cache.rows(s.row, s.row + 1))
            if s.max_new == 0:
                self._finish(s, Event(None, finish_reason="length"))

    @staticmethod
    def _pick(ready: list[_Slot]) -> tuple[list[int | None], torch.Tensor]:
        """Greedy tokens of the rows that need no per-row processing (temperature 0, no penalties): one
        argmax over the stacked logits (B, V); None for the others. Also log p (B, V) of every row."""
        logits = torch.cat([s.logits for s in ready]).float()  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        plain = [s.req.params.greedy and not s.req.params.uses_history for s in ready]
        toks: list[int | None] = [None] * len(ready)
        if any(plain):
            arg = logits.argmax(-1).tolist()
            toks = [a if ok else None for a, ok in zip(arg, plain)]
        return toks, logp

    def _tail_hit(self, s: _Slot) -> bool:
        """Does the output now hold a stop string? Any new hit ends in the newest token, so decoding the
        last few tokens is enough: a stop string of L characters lies within the last L tokens when every
        token gives at least one character; 2L + 8 leaves room for pieces of multi-byte characters."""
        stops = s.req.params.stop
        k = 2 * max(len(x) for x in stops) + 8
        return _stop_string_hit(self.detok(s.out[-k:]), stops) >= 0

    def _sample(self, s: _Slot, tok: int | None, logp: torch.Tensor) -> int | None:
        """Sample a row's next token (unless `_pick` chose it) and emit it; logp (V,): the row's raw
        log-probs. The token to feed back, or None when it finished."""
        p, logits = s.req.params, s.logits
        s.logits = None
        if tok is None:
            tok = int(sample(process_logits(logits, p, s.history.seen, s.history.counts), p, s.gen)[0])
        s.history.add(torch.tensor([tok]))
        now = time.perf_counter()
        if not s.out and s.t_last == 0.0:
            self.metrics.observe("ttft_seconds", now - s.req.t_submit)
        else:
            self.metrics.observe("itl_seconds", now - s.t_last)
        s.t_last = now
        if tok in p.stop_ids:
            self._finish(s, Event(None, finish_reason="stop"))
            return None
        ev = Event(tok, float(logp[tok]))
        if p.logprobs:
            v, i = logp.topk(p.logprobs)
            ev.top = list(zip(i.tolist(), v.tolist()))
        s.out.append(tok)
        self.metrics.inc("completion_tokens")
        if p.stop and self._tail_hit(s):
            ev.finish_reason = "stop"
        elif len(s.out) >= s.max_new:
            ev.finish_reason = "length"
        if ev.finish_reason:
            self._finish(s, ev)
            return None
        s.req.emit(ev)
        return tok

    def _decode(self, going: list[tuple[_Slot, int]]):
        """One batched forward over rows 0..top: each going row feeds its token at its position; other
        rows get token 0 at their next free position (overwritten by their own next write)."""
        top = max(s.row for s, _ in going) + 1
        tokens = torch.zeros(top, dtype=torch.long)
        pos = torch.zeros(top, dtype=torch.long)
        for s in self.slots[:top]:
            if s is not None:
                pos[s.row] = min(s.pos, self.max_len - 1)
        for s, t in going:
            tokens[s.row], pos[s.row] = t, s.pos
        try:
            logits = decode_step(self.model, tokens, pos, self.cache.rows(0, top))  # (top, V)
        except Exception as e:  # the forward itself failed: these rows cannot go on
            for s, _ in going:
                self._finish(s, Event(None, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            return
        for s, _ in going:
            s.pos += 1
            s.logits = logits[s.row:s.row + 1]

    def _finish(self, s: _Slot, ev: Event):
        if self.slots[s.row] is s:
            self.slots[s.row] = None
        self.metrics.inc(f"finished_{ev.finish_reason}")
        try:
            s.req.emit(ev)
        except Exception:  # the receiver is gone; nothing to tell
            pass
