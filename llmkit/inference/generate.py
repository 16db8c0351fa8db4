"""Generation as plain functions over token ids and a pre-allocated cache.

    prefill(model, ids, cache)            prompt -> logits of its last token (optionally in chunks)
    decode_step(model, tokens, pos, cache) one token per row -> next logits
    iter_generate(model, prompts, params)  the decode loop, yielding per-step token events
    generate / generate_batch              collect the events into `Generation`s
    stream(model, tokenizer, ids, params)  text deltas (the only place text appears, with stop strings)
    best_of_n                              n candidates, the best by mean log-prob or a score function
    speculative_generate                   draft proposes k tokens, target verifies them in one pass
    mtp_generate                           the same, drafted by the model's own multi-token prediction heads

Shapes: B rows, T tokens, V vocab. Log-probs reported are those of the raw model distribution
(log_softmax of the logits before any sampling processor), as `llmkit score` computes them.

Devices: the forwards and the cache live on the model's device; prefill/decode_step hand their
(B, V) logits back on the CPU, where sampling runs with a CPU generator, so a seed gives the same
sample on any device (the copy is one row of logits per step, small next to a forward).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..devices import model_device
from ..errors import LLMKitError
from .prefix import PrefixCache
from .sampling import History, SamplingParams, make_generator, probs_from_logits, process_logits, sample


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the model, per token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # top alternatives per token
    finish_reason: str | None = None  # "stop" (stop id / stop string) | "length"
    text: str | None = None  # set at the text edge (generate with a tokenizer, stream)
    score: float | None = None  # best_of_n's ranking score

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


@dataclass
class Generation:
    prompt_tokens: list[int]
    completions: list[Completion]
    timings: dict = field(default_factory=dict)  # prefill_s, ttft_s, decode_s, new_tokens
    stats: dict = field(default_factory=dict)  # prefix_hit_tokens; speculative acceptance

    @property
    def tokens(self) -> list[int]:
        return self.completions[0].tokens

    @property
    def text(self) -> str | None:
        return self.completions[0].text


@dataclass
class TokenEvent:
    row: int
    token: int | None  # None when the row ended on a stop id (the stop token is not part of the output)
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


# ---------------------------------------------------------------- model steps
def _positions(start: int, end: int, device=None) -> torch.Tensor:
    return torch.arange(start, end, dtype=torch.long, device=device)


def _chunk_positions(start: int | torch.Tensor, s: int, e: int, device=None) -> torch.Tensor:
    """Positions of tokens s..e-1 of a chunk: (e-s,) shared, or (B, e-s) when `start` is per row (B,)."""
    if isinstance(start, int):
        return _positions(start + s, start + e, device)
    return (start[:, None] + torch.arange(s, e)).to(device)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, start: int | torch.Tensor = 0, chunk_size: int | None = None,
            last_index: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ids (B, T) at positions start..start+T-1 into the cache; return logits (B, V) of the
    last token, or of token `last_index[b]` of each row (right-padded prompts of different lengths).
    `start` is an int, or (B,) per row (a server prefilling several requests' prompts, each from its
    own position, in one forward: needs a cache with per-row positions, BatchKVCache).
    The logits come back on the CPU (see the module docstring).

    chunk_size: feed C tokens per forward (bounded activation memory; same result).
    """
    dev = model_device(model)
    ids = ids.to(dev)
    B, T = ids.shape
    C = chunk_size or T
    if C <= 0:
        raise LLMKitError(f"chunk size must be positive, got {C}")
    hidden = []
    for s in range(0, T, C):
        e = min(T, s + C)
        if last_index is None and e < T:  # only the final chunk's last logits are needed
            model(ids[:, s:e], input_pos=_chunk_positions(start, s, e, dev), cache=cache, return_hidden=True,
                  last_only=True)
            continue
        hidden.append(model(ids[:, s:e], input_pos=_chunk_positions(start, s, e, dev), cache=cache,
                            return_hidden=True, last_only=last_index is None))
    h = torch.cat(hidden, dim=1)  # (B, T or 1, C)
    if last_index is not None:
        h = h[torch.arange(B, device=dev), last_index.to(dev)]
    else:
        h = h[:, -1]
    return model.lm_head(h).cpu()  # (B, V)


def _step(model, tokens: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
    """The graph `torch.compile` traces: tokens (B,) at per-row positions input_pos (B, 1) over a
    StaticKVCache -> logits (B, V). The same modules as the eager path, only the cache's view differs."""
    return model(tokens[:, None], input_pos=input_pos, cache=cache, last_only=True)[:, -1]


@functools.cache
def _compiled_step(device_type: str = "cpu"):
    """One compiled `_step` per process and device kind (dynamo keeps one graph per model and cache
    layout; a new batch size or cache length recompiles once, as a dynamic size, then never again).
    On the CPU the graph's wrapper is C++ (inductor's cpp_wrapper), not Python: no interpreter work
    per kernel call (BENCHMARKS.md, compiled decode, stop 29)."""
    return torch.compile(_step, options={"cpp_wrapper": True} if device_type == "cpu" else None)


STATIC_BUCKET = 64  # compiled decode reads the cache in slot counts rounded up to this (see decode_step)


def _unguarded(model, tokens: torch.Tensor, input_pos: torch.Tensor, view) -> Callable | None:
    """The compiled `_step` these arguments just ran, as a plain function that skips dynamo's guards.

    dynamo checks guards on every call of a compiled function: every tensor the graph reads (SmolLM2:
    ~370 of them, weights and cache slots) and the module attributes it depends on, ~1 ms of a ~7 ms
    compiled int4 step on the AMD EPYC (BENCHMARKS.md). Within one cache's decode loop none of that
    changes, so `decode_step` checks the guards on a cache's first compiled step (the normal call), then
    finds the cache entry whose guards these arguments pass and runs that entry's bytecode directly
    for the cache's later steps (the bytecode reads the weights afresh each call and runs the same
    compiled graph). None when torch's cache entries cannot be read (then every step is guarded)."""
    import types

    try:
        entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(_step.__code__)
        f_locals = {"model": model, "tokens": tokens, "input_pos": input_pos, "cache": view}
        for e in entries:
            if not e.code.co_freevars and e.guard_manager.check(f_locals):
                return types.FunctionType(e.code, _step.__globals__)
    except (AttributeError, RuntimeError, TypeError):
        pass
    return None


def _compilable(cache) -> bool:
    """Whether the compiled step can take this cache: full slots (a BatchKVCache), not a rolling buffer."""
    from ..models.cache import BatchKVCache

    return isinstance(cache, BatchKVCache)


def _build_rope_tables(model, device) -> None:
    """Build the rope tables for the whole window before a step is traced, so the graph reads no position
    (see Transformer.rope); a guarded call's job only: the tables, once built, stay."""
    cfg = model.cfg
    if cfg.pos_emb == "rope":
        last = torch.tensor([cfg.max_seq_len - 1], device=device)
        model.rope(last)
        if cfg.sliding_window_pattern and cfg.rope_local_theta:
            model.rope(last, local=True)


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor | int, cache, compiled: bool = False) -> torch.Tensor:
    """tokens (B,) at positions pos (int, or (B,) per row) -> next-token logits (B, V) on the CPU.

    compiled: run the step as one torch.compile graph over the cache's static view (the first call of
    a process compiles: ~65 s on 2 cores with a cold inductor cache, ~10 s with a warm one). It removes
    the eager per-op overhead (~30 ops per layer), the largest cost of a small model's decode step; the
    logits equal the eager ones to float rounding (fused kernels), and one graph serves every position,
    cache length and bucket (`static(length)`: the step reads the slots up to the next multiple of
    STATIC_BUCKET). dynamo's guards are checked on a cache's first compiled step only (`_unguarded`).
    Opt-in, not the default: the compile is more than a short answer's whole decode; steady state on
    the AMD EPYC (BENCHMARKS.md) the compiled int4 step decodes 1.7-1.9x eager and 1.06-1.17x llama.cpp.
    Falls back to eager for caches it cannot take (a rolling buffer)."""
    dev = model_device(model)
    if compiled and _compilable(cache):
        pos = torch.full((tokens.size(0),), pos) if isinstance(pos, int) else pos
        hi = int(pos.max()) + cache.offset  # the range checks the graph leaves out (reading a position)
        if hi >= cache.max_len:
            raise LLMKitError(f"position {hi - cache.offset} is past the cache's {cache.max_len} slots")
        if hi >= model.cfg.max_seq_len:
            raise LLMKitError(f"sequence of {hi + 1} tokens is longer than the model's context window of "
                              f"{model.cfg.max_seq_len}")
        # attend over the slots up to the next multiple of STATIC_BUCKET past the last position, not the
        # whole cache: a view per bucket, one graph for all (the slot count is a dynamic size)
        view = cache.static(-(-(hi + 1) // STATIC_BUCKET) * STATIC_BUCKET)
        tokens, input_pos = tokens.to(dev), pos[:, None].to(dev)
        # what the guards checked that could differ between two steps on one cache (`_unguarded`)
        key = (id(model), model.training, torch.is_inference_mode_enabled(), torch.is_autocast_enabled(dev.type),
               tuple(tokens.shape), tokens.dtype, tuple(input_pos.shape), input_pos.dtype, dev)
        known = view.__dict__.get("_unguarded")  # (key, function or None) from this cache's first step
        if known is not None and known[0] == key and known[1] is not None:
            return known[1](model, tokens, input_pos, view).cpu()
        _build_rope_tables(model, dev)
        logits = _compiled_step(dev.type)(model, tokens, input_pos, view)
        if known is None or known[0] != key:
            view._unguarded = (key, _unguarded(model, tokens, input_pos, view))
        return logits.cpu()
    if isinstance(pos, int):
        input_pos = torch.tensor([pos])
    elif bool((pos == pos[0]).all()):  # shared position: the cheaper (T,) path
        input_pos = pos[:1]
    else:
        input_pos = pos[:, None]
    return model(tokens[:, None].to(dev), input_pos=input_pos.to(dev), cache=cache, last_only=True)[:, -1].cpu()


def check_prompt(prompt: list[int], model, max_new_tokens: int, truncate: bool = False) -> list[int]:
    """A prompt must fit the tokens the model takes (`model.max_tokens`: its context window less any
    prefix) with room for one new token; cut its front only if asked."""
    ctx = model.max_tokens
    if not prompt:
        raise LLMKitError("empty prompt: give at least one token")
    bad = [t for t in prompt if not 0 <= t < model.cfg.vocab_size]
    if bad:
        raise LLMKitError(f"token id {bad[0]} is outside the model's vocabulary (size {model.cfg.vocab_size})")
    if len(prompt) + max(max_new_tokens, 1) > ctx:
        if not truncate:
            raise LLMKitError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens is longer than the "
                              f"context window of {ctx} (pass truncate=True / --truncate to drop the oldest tokens)")
        keep = max(1, ctx - max(max_new_tokens, 1))
        prompt = prompt[-keep:]
    return prompt


def _stop_string_hit(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


# ---------------------------------------------------------------- the decode loop
@torch.inference_mode()
def iter_generate(model, prompts: list[list[int]], params: SamplingParams, *, prefix_cache: PrefixCache | None = None,
                  chunk_size: int | None = None, truncate: bool = False,
                  detok: Callable[[list[int]], str] | None = None, timings: dict | None = None,
                  stats: dict | None = None, compiled: bool = False) -> Iterator[list[TokenEvent]]:
    """Generate for each prompt `params.n` completions; yield the step's events (one per live row).

    Rows are prompt-major: row r is sample r % n of prompt r // n. Prompts of different lengths are
    right-padded and prefilled together; each row then decodes at its own positions. detok (ids -> str)
    is needed only for stop strings. timings/stats dicts, when given, are filled in. compiled: decode
    steps as one compiled graph (`decode_step`); the prefill stays eager (one call, large matmuls).
    """
    if params.stop and detok is None:
        raise LLMKitError("stop strings need a tokenizer")
    prompts = [check_prompt(list(p), model, params.max_new_tokens, truncate) for p in prompts]
    # the decoder that continues the prompts and its start tokens: a decoder-only model itself and the
    # prompts; an encoder-decoder (models/t5.py) its decoder over the prompts, encoded once, and its start token
    model, prompts = model.decoder_for(prompts)
    cfg = model.cfg
    P, n = len(prompts), params.n
    lengths = torch.tensor([len(p) for p in prompts])
    T = int(lengths.max())
    max_new = min(params.max_new_tokens, model.max_tokens - T)
    timings = {} if timings is None else timings
    stats = {} if stats is None else stats
    t0 = time.perf_counter()
    dev = model_device(model)
    # a rolling buffer only where it saves memory and rows share positions; prefix reuse needs full slots
    rolling = bool(cfg.uniform_window and P == 1 and prefix_cache is None and T + max_new > cfg.uniform_window)
    cache = model.new_cache(P, T + max(max_new, 1), rolling=rolling)
    start = 0
    if prefix_cache is not None:
        if P != 1:
            raise LLMKitError("prefix caching takes one prompt at a time")
        start = prefix_cache.load(model, prompts[0], cache)
        stats["prefix_hit_tokens"] = start
    ids = torch.zeros(P, T - start, dtype=torch.long)  # right-padded with token 0 (never attended)
    for b, p in enumerate(prompts):
        ids[b, : len(p) - start] = torch.tensor(p[start:])
    ragged = bool((lengths != T).any())
    logits = prefill(model, ids, cache, start=start, chunk_size=chunk_size,
                     last_index=(lengths - 1 - start) if ragged else None)
    if prefix_cache is not None:
        prefix_cache.store(model, prompts[0], cache)
    timings["prefill_s"] = time.perf_counter() - t0
    timings["prompt_tokens"] = int(lengths.sum())
    rows = torch.arange(P).repeat_interleave(n)  # (R,)
    if n > 1:
        cache = cache.select_rows(rows.to(dev))
        logits = logits[rows]
    R = P * n
    pos = lengths[rows].clone()  # (R,) position of each row's next token
    history = History.start([prompts[int(r)] for r in rows], cfg.vocab_size, params)
    gen = make_generator(params.seed)
    stop_ids = set(params.stop_ids)
    outputs: list[list[int]] = [[] for _ in range(R)]
    live = [True] * R
    if max_new == 0:
        yield [TokenEvent(r, None, finish_reason="length") for r in range(R)]
        return
    for step in range(max_new):
        processed = process_logits(logits, params, history.seen, history.counts)
        tok = sample(processed, params, gen)  # (R,)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(-1, tok[:, None])[:, 0].tolist()
        if params.logprobs:
            top_v, top_i = logp.topk(params.logprobs, dim=-1)
        history.add(tok)
        events = []
        for r, t in enumerate(tok.tolist()):
            if not live[r]:
                continue
            if t in stop_ids:
                live[r] = False
                events.append(TokenEvent(r, None, finish_reason="stop"))
                continue
            outputs[r].append(t)
            top = list(zip(top_i[r].tolist(), top_v[r].tolist())) if params.logprobs else []
            ev = TokenEvent(r, t, chosen[r], top)
            if params.stop and _stop_string_hit(detok(outputs[r]), params.stop) >= 0:
                ev.finish_reason = "stop"
            elif step == max_new - 1:
                ev.finish_reason = "length"
            if ev.finish_reason:
                live[r] = False
            events.append(ev)
        yield events
        if not any(live):
            break
        logits = decode_step(model, tok, pos, cache, compiled)
        pos += 1
    timings["total_s"] = time.perf_counter() - t0


def _collect(events: Iterator[list[TokenEvent]], R: int, timings: dict) -> list[Completion]:
    comps = [Completion() for _ in range(R)]
    t_first = None
    for step in events:
        if t_first is None:
            t_first = time.perf_counter()
        for ev in step:
            c = comps[ev.row]
            if ev.token is not None:
                c.tokens.append(ev.token)
                c.logprobs.append(ev.logprob)
                if ev.top:
                    c.top_logprobs.append(ev.top)
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
    if t_first is not None:
        timings["decode_s"] = time.perf_counter() - t_first
    return comps


def _finish_text(comps: list[Completion], tokenizer, params: SamplingParams):
    """Decode completions at the text edge, cutting each before its first stop string."""
    for c in comps:
        text = tokenizer.decode(c.tokens)
        cut = _stop_string_hit(text, params.stop) if params.stop else -1
        c.text = text[:cut] if cut >= 0 else text


def generate_batch(model, prompts: list[list[int]], params: SamplingParams | None = None, *, tokenizer=None,
                   chunk_size: int | None = None, truncate: bool = False, compiled: bool = False) -> list[Generation]:
    """Generate for several prompts at once (right-padded, per-row positions). With greedy decoding
    each result equals generating that prompt alone. A tokenizer adds `.text` and enables stop strings."""
    params = params or SamplingParams()
    if not prompts:
        raise LLMKitError("no prompts given")
    timings: dict = {}
    detok = tokenizer.decode if tokenizer is not None else None
    prompts = [check_prompt(list(p), model, params.max_new_tokens, truncate) for p in prompts]
    events = iter_generate(model, prompts, params, chunk_size=chunk_size, truncate=truncate, detok=detok,
                           timings=timings, compiled=compiled)
    t0 = time.perf_counter()
    comps = _collect(events, len(prompts) * params.n, timings)
    timings["ttft_s"] = timings.get("prefill_s", 0.0)
    timings["wall_s"] = time.perf_counter() - t0
    if tokenizer is not None:
        _finish_text(comps, tokenizer, params)
    n = params.n
    out = []
    for i, p in enumerate(prompts):
        t = dict(timings, new_tokens=sum(len(c.tokens) for c in comps[i * n:(i + 1) * n]))
        out.append(Generation(list(p), comps[i * n:(i + 1) * n], t))
    return out


def generate(model, prompt: list[int], params: SamplingParams | None = None, *, tokenizer=None,
             prefix_cache: PrefixCache | None = None, chunk_size: int | None = None,
             truncate: bool = False, compiled: bool = False) -> Generation:
    """Generate `params.n` completions of one prompt (token ids). See `iter_generate`."""
    params = params or SamplingParams()
    timings: dict = {}
    stats: dict = {}
    detok = tokenizer.decode if tokenizer is not None else None
    prompt = check_prompt(list(prompt), model, params.max_new_tokens, truncate)
    events = iter_generate(model, [prompt], params, prefix_cache=prefix_cache, chunk_size=chunk_size,
                           truncate=truncate, detok=detok, timings=timings, stats=stats, compiled=compiled)
    comps = _collect(events, params.n, timings)
    timings["ttft_s"] = timings.get("prefill_s", 0.0)
    timings["new_tokens"] = sum(len(c.tokens) for c in comps)
    if tokenizer is not None:
        _finish_text(comps, tokenizer, params)
    return Generation(list(prompt), comps, timings, stats)


class TextStream:
    """Token ids of one completion in, text deltas out: deltas never split a UTF-8 character across
    byte-level tokens (tokenizer.stream_decoder) and never show text of a stop string, because text
    that could still grow into one is held back. Used by `stream` and by the server (llmkit.serve)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.dec = tokenizer.stream_decoder()
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of self.text already handed out

    def put(self, token: int | None, finished: bool = False) -> str:
        """Add a token (None: none, e.g. a stop id); `finished` on the completion's last event."""
        if token is not None:
            self.text += self.dec.put(token)
        if finished:
            self.text += self.dec.flush()
            cut = _stop_string_hit(self.text, self.stop) if self.stop else -1
            end = cut if cut >= 0 else len(self.text)
        else:
            end = len(self.text) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    @property
    def final_text(self) -> str:
        return self.text[:self.sent]


def stream(model, tokenizer, prompt: list[int], params: SamplingParams | None = None, *,
           prefix_cache: PrefixCache | None = None, truncate: bool = False,
           completion: Completion | None = None) -> Iterator[str]:
    """Text deltas of one completion as they are generated (see `TextStream`). `completion`, if given,
    receives tokens/log-probs."""
    params = params or SamplingParams()
    if params.n != 1:
        raise LLMKitError("streaming takes n=1")
    ts = TextStream(tokenizer, params.stop)
    comp = completion if completion is not None else Completion()
    for step in iter_generate(model, [prompt], params, prefix_cache=prefix_cache, truncate=truncate,
                              detok=tokenizer.decode):
        ev = step[0]
        if ev.token is not None:
            comp.tokens.append(ev.token)
            comp.logprobs.append(ev.logprob)
        if ev.finish_reason:
            comp.finish_reason = ev.finish_reason
        delta = ts.put(ev.token, finished=bool(ev.finish_reason))
        if delta:
            yield delta
    comp.text = ts.final_text


# ---------------------------------------------------------------- best-of-N
def best_of_n(model, prompt: list[int], params: SamplingParams, n: int,
              score_fn: Callable[[list[int], list[int]], float] | None = None, *, tokenizer=None,
              truncate: bool = False) -> Generation:
    """Sample n candidates; rank them by score_fn(prompt, tokens) (e.g. a reward model) or, by default,
    by mean log-prob per token. Returns the candidates best first, each with `.score`."""
    if n < 1:
        raise LLMKitError(f"best-of n must be >= 1, got {n}")
    params = SamplingParams(**{**params.__dict__, "n": n})
    g = generate(model, prompt, params, tokenizer=tokenizer, truncate=truncate)
    for c in g.completions:
        c.score = float(score_fn(list(prompt), c.tokens)) if score_fn else c.mean_logprob
    g.completions.sort(key=lambda c: c.score, reverse=True)
    return g


# ---------------------------------------------------------------- speculative decoding
class _Emitter:
    """Appends accepted tokens to one completion; calling it returns True when generation ends (a stop
    id, a stop string, or max_new tokens)."""

    def __init__(self, comp: Completion, history: History, params: SamplingParams, tokenizer, max_new: int):
        self.comp, self.history, self.params, self.tokenizer, self.max_new = comp, history, params, tokenizer, max_new
        self.stop_ids = set(params.stop_ids)

    def __call__(self, t: int, lp: float) -> bool:
        comp = self.comp
        if t in self.stop_ids:
            comp.finish_reason = "stop"
            return True
        comp.tokens.append(t)
        comp.logprobs.append(lp)
        self.history.add(torch.tensor([t]))
        if self.params.stop and _stop_string_hit(self.tokenizer.decode(comp.tokens), self.params.stop) >= 0:
            comp.finish_reason = "stop"
            return True
        if len(comp.tokens) >= self.max_new:
            comp.finish_reason = "length"
            return True
        return False


def check_draft(target, draft):
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise LLMKitError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs from the "
                          f"target's ({target.cfg.vocab_size}): speculative decoding needs a shared vocabulary")


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, gen: torch.Generator | None):
    """Modified rejection sampling (Leviathan et al. 2023, alg. 1; Chen et al. 2023, alg. 2).

    p: (B, k+1, V) target distributions at the k draft positions and one past them;
    q: (B, k, V) draft distributions the k drafts (B, k) were sampled from.
    Draft i is kept with prob min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
    norm(max(0, p_i - q_i)); if all k are kept, one more from p_{k+1}. The output then follows p exactly.
    Returns (n_accepted (B,), next_token (B,)).
    """
    B, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, k, generator=gen)
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q
    n_acc = torch.where(ok.all(-1), k, (~ok).float().argmax(-1))  # first rejection, or k
    rows = torch.arange(B)
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # no draft past position k: residual = p
    resid = (p[rows, n_acc] - q_pad[rows, n_acc]).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    # p == q at a rejected position cannot happen (rejection needs p(d) < q(d)); guard anyway
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p[rows, n_acc])
    nxt = torch.multinomial(resid, 1, generator=gen)[:, 0]
    return n_acc, nxt


@torch.inference_mode()
def _verify_drafts(logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor], params: SamplingParams,
                   history, gen, emit) -> tuple[int, list[int], bool]:
    """The target's verdict on k drafts, emitted. logits (k+1, V): the target at [tok, d1..dk]; qs: the k
    draft distributions (1, V). Each position's distribution is processed as plain decoding would
    (penalties see the drafts before it), then speculative_accept; the new tokens (drafts[:a] + the
    target's next one) go to `emit(token, logprob)` until it says stop. -> (a, new tokens, stopped)."""
    kk = len(drafts)
    th = history.clone()
    ps = []
    for i in range(kk + 1):
        ps.append(probs_from_logits(process_logits(logits[i:i + 1], params, th.seen, th.counts), params))
        if i < kk:
            th.add(torch.tensor([drafts[i]]))
    n_acc, nxt = speculative_accept(torch.stack(ps, 1), torch.stack(qs, 1), torch.tensor([drafts]), gen)
    a = int(n_acc[0])
    new, logp = drafts[:a] + [int(nxt[0])], torch.log_softmax(logits.float(), -1)
    stopped = any(emit(t, float(logp[i, t])) for i, t in enumerate(new))  # any() stops at the first True
    return a, new, stopped


def speculative_generate(target, draft, prompt: list[int], params: SamplingParams | None = None, *, k: int = 4,
                         tokenizer=None, truncate: bool = False) -> Generation:
    """Speculative decoding of one prompt: `draft` proposes k tokens, `target` scores them in one
    forward, `speculative_accept` keeps the output distribution exactly the target's. At temperature 0
    both distributions are one-hot, so the output is token for token the target's greedy output.
    stats: proposed, accepted, acceptance_rate (accepted drafts / proposed drafts), target_forwards.
    """
    params = params or SamplingParams()
    check_draft(target, draft)
    if k < 1:
        raise LLMKitError(f"number of draft tokens must be >= 1, got {k}")
    if params.n != 1:
        raise LLMKitError("speculative decoding takes n=1")
    if params.stop and tokenizer is None:
        raise LLMKitError("stop strings need a tokenizer")
    prompt = check_prompt(list(prompt), target, params.max_new_tokens, truncate)
    ctx = min(target.max_tokens, draft.max_tokens)
    T = len(prompt)
    max_new = min(params.max_new_tokens, ctx - T)
    # full caches (not rolling): rejected drafts are rolled back by position, which a ring would lose
    size = min(ctx, T + max_new + k + 1)
    tcache, dcache = target.new_cache(1, size), draft.new_cache(1, size)
    gen = make_generator(params.seed)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt])
    t_logits = prefill(target, ids, tcache)  # (1, V)
    seq = list(prompt)
    history = History.start([prompt], target.cfg.vocab_size, params)
    comp = Completion()
    tok = int(sample(process_logits(t_logits, params, history.seen, history.counts), params, gen)[0])
    timings = {"prefill_s": time.perf_counter() - t0}
    d_done = 0  # draft cache holds positions < d_done
    proposed = accepted = forwards = 0

    emit = _Emitter(comp, history, params, tokenizer, max_new)
    done = max_new == 0
    if done:
        comp.finish_reason = "length"
    else:
        done = emit(tok, float(torch.log_softmax(t_logits.float(), -1)[0, tok]))
    t1 = time.perf_counter()
    while not done:
        seq.append(tok)
        n = len(seq) - 1  # position of the pending token `tok` (not yet in either cache)
        kk = min(k, ctx - 1 - n)  # room left in the context window
        if kk < 1:
            comp.finish_reason = "length"
            break
        # draft: catch up on tokens it has not seen, then propose kk tokens
        d_logits = prefill(draft, torch.tensor([seq[d_done:]]), dcache, start=d_done)
        dh = history.clone()
        drafts, qs = [], []
        for i in range(kk):
            q_proc = process_logits(d_logits, params, dh.seen, dh.counts)
            qs.append(probs_from_logits(q_proc, params))
            d = sample(q_proc, params, gen) if params.greedy else torch.multinomial(qs[-1], 1, generator=gen)[:, 0]
            drafts.append(int(d[0]))
            dh.add(d)
            if i < kk - 1:
                d_logits = decode_step(draft, d, n + 1 + i, dcache)
        # target: score [tok, d1..dk] at positions n..n+k in one forward
        dev = model_device(target)
        block = torch.tensor([[tok] + drafts], device=dev)
        logits = target(block, input_pos=_positions(n, n + kk + 1, dev), cache=tcache)[0].cpu()  # (k+1, V)
        forwards += 1
        a, new, done = _verify_drafts(logits, drafts, qs, params, history, gen, emit)
        proposed += kk
        accepted += a
        # the draft saw tok, d1..d_{kk-1}; keep what is still on the accepted path
        d_done = n + min(a, kk - 1) + 1
        seq.extend(new[:-1])
        tok = new[-1]
    timings["decode_s"] = time.perf_counter() - t1
    timings["ttft_s"] = timings["prefill_s"]
    timings["new_tokens"] = len(comp.tokens)
    if tokenizer is not None:
        _finish_text([comp], tokenizer, params)
    stats = {"proposed": proposed, "accepted": accepted, "target_forwards": forwards,
             "acceptance_rate": accepted / proposed if proposed else 0.0}
    return Generation(prompt, [comp], timings, stats)


@torch.inference_mode()
def mtp_generate(model, prompt: list[int], params: SamplingParams | None = None, *, tokenizer=None,
                 truncate: bool = False) -> Generation:
    """Self-speculative decoding with the model's multi-token prediction modules (DeepSeek-V3 sec. 5.4.3;
    the draft-and-verify of Leviathan et al. 2023 with no second model).

    Each round, MTP depth d (d = 1..D) reads the hidden state the last target forward left at position
    n-1 (depth d-1's, for d > 1) and the embedding of the token d ahead, and proposes the token at n+d;
    the target scores [tok, d_1..d_D] in one forward and `speculative_accept` keeps the output
    distribution exactly the target's (token for token its greedy output at temperature 0). That
    forward's hidden states feed the next round's drafts, so drafting costs D small blocks, not a
    second model. The MTP blocks keep their K/V in the same cache (layers n_layer..). With D > 1,
    depth d's cache entries for the last d-1 positions of a round were computed from drafted tokens
    (not recomputed if rejected): that only changes the drafts, never the output.
    stats: proposed, accepted, acceptance_rate, target_forwards (as `speculative_generate`).
    """
    params = params or SamplingParams()
    D = model.cfg.mtp_depth
    if not D or getattr(model, "mtp", None) is None:
        raise LLMKitError("the model has no multi-token prediction modules (mtp_depth=0): nothing to draft with")
    if params.n != 1:
        raise LLMKitError("speculative decoding takes n=1")
    if params.stop and tokenizer is None:
        raise LLMKitError("stop strings need a tokenizer")
    prompt = check_prompt(list(prompt), model, params.max_new_tokens, truncate)
    ctx, T = model.max_tokens, len(prompt)
    max_new = min(params.max_new_tokens, ctx - T)
    cache = model.new_cache(1, min(ctx, T + max_new + D + 1))
    dev = model_device(model)
    gen = make_generator(params.seed)
    t0 = time.perf_counter()
    h = model(torch.tensor([prompt], device=dev), input_pos=_positions(0, T, dev), cache=cache,
              return_hidden=True)  # (1, T, C): every prompt position feeds the MTP modules
    t_logits = model.lm_head(h[:, -1]).cpu()
    history = History.start([prompt], model.cfg.vocab_size, params)
    comp = Completion()
    emit = _Emitter(comp, history, params, tokenizer, max_new)
    tok = int(sample(process_logits(t_logits, params, history.seen, history.counts), params, gen)[0])
    timings = {"prefill_s": time.perf_counter() - t0}
    seq, h_start = list(prompt), 0  # h holds the main model's hidden states at positions h_start..len(seq)-1
    proposed = accepted = forwards = 0
    done = max_new == 0
    if done:
        comp.finish_reason = "length"
    else:
        done = emit(tok, float(torch.log_softmax(t_logits.float(), -1)[0, tok]))
    t1 = time.perf_counter()
    while not done:
        n = len(seq)  # position of the pending token `tok`
        kk = min(D, ctx - 1 - n)
        if kk < 1:
            comp.finish_reason = "length"
            break
        # draft: depth d over positions h_start..n-1, each reading the token d ahead
        ahead = seq[h_start + 1:] + [tok]
        pos = _positions(h_start, n, dev)
        dh = history.clone()
        drafts, qs = [], []
        hk = h
        for d in range(kk):
            hk, lg = model.mtp_forward(d, hk, torch.tensor([ahead], device=dev), pos, cache)
            q_proc = process_logits(lg[:, -1].cpu(), params, dh.seen, dh.counts)
            qs.append(probs_from_logits(q_proc, params))
            x = sample(q_proc, params, gen) if params.greedy else torch.multinomial(qs[-1], 1, generator=gen)[:, 0]
            drafts.append(int(x[0]))
            dh.add(x)
            ahead = ahead[1:] + [drafts[-1]]
        # verify: the target scores [tok, d_1..d_kk] at positions n..n+kk in one forward
        hb = model(torch.tensor([[tok] + drafts], device=dev), input_pos=_positions(n, n + kk + 1, dev), cache=cache,
                   return_hidden=True)  # (1, kk+1, C)
        logits = model.lm_head(hb)[0].cpu()
        forwards += 1
        a, new, done = _verify_drafts(logits, drafts, qs, params, history, gen, emit)
        proposed += kk
        accepted += a
        seq += [tok] + drafts[:a]
        h, h_start, tok = hb[:, :a + 1], n, new[-1]  # hidden states of the accepted positions n..n+a
    timings["decode_s"] = time.perf_counter() - t1
    timings["ttft_s"] = timings["prefill_s"]
    timings["new_tokens"] = len(comp.tokens)
    if tokenizer is not None:
        _finish_text([comp], tokenizer, params)
    stats = {"proposed": proposed, "accepted": accepted, "target_forwards": forwards,
             "acceptance_rate": accepted / proposed if proposed else 0.0}
    return Generation(prompt, [comp], timings, stats)


def truncated_draft(model, n_layer: int):
    """A draft model sharing the first n_layer blocks, final norm and head of `model` (no weight
    copy): cheap to build, same vocabulary, a reasonable guesser for easy tokens."""
    if not 1 <= n_layer <= model.cfg.n_layer:
        raise LLMKitError(f"draft depth must be in 1..{model.cfg.n_layer}, got {n_layer}")
    d = copy.copy(model)  # shallow: every submodule is shared
    d._modules = dict(model._modules)
    d.layers = torch.nn.ModuleList(model.layers[:n_layer])
    d.cfg = type(model.cfg).from_dict({**model.cfg.to_dict(), "n_layer": n_layer})
    return d
