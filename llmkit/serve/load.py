"""A bounded load generator for OpenAI-compatible servers (`llmkit bench serve`).

`run_load(url, prompts, concurrency, requests)` sends `requests` streamed chat completions from
`concurrency` concurrent clients (asyncio + httpx on loopback) and measures, per request, the time
to the first content chunk (TTFT) and between content chunks (inter-token latency, ITL), the tokens
received (the server's `usage` when it sends it, else content chunks) and whether the answer is whole:
the stream ended with [DONE] after a finish_reason, and a "length" finish carries max_tokens tokens.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
    "List three uses of copper.", "Why is the sky blue?", "What does a compiler do?",
    "Give me a tip for learning to cook.", "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?", "Name three planets and one fact about each.",
    "How do vaccines work?", "Summarise the plot of Romeo and Juliet.", "What is a prime number?",
    "Suggest a name for a bakery.", "How does a bicycle stay upright?", "What is machine learning?",
]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def system_prompt(n_words: int) -> str:
    """A long shared system prompt (about 1.2 tokens a word for SmolLM2's tokenizer), the case prefix
    caching is for: every request starts with it."""
    words = ("You are a careful assistant for a library help desk. Answer briefly, cite the shelf mark when a "
             "book is named, never invent titles, ask a short question back when a request is ambiguous, and "
             "keep a friendly tone. ").split()
    return " ".join(words[i % len(words)] for i in range(n_words))


async def _one(client, url: str, model: str, prompt: str, max_tokens: int, headers: dict,
               system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times, text, finish, done, usage, error = [], "", None, False, None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    d = json.loads(data)
                    if "error" in d:
                        error = str(d["error"])
                        break
                    usage = d.get("usage") or usage
                    for c in d.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content")
                        if piece:
                            times.append(time.perf_counter())
                            text += piece
                        finish = c.get("finish_reason") or finish
    except Exception as e:  # connection refused / reset: a lost response
        error = f"{type(e).__name__}: {e}"
    tokens = (usage or {}).get("completion_tokens", len(times))
    whole = error is None and done and finish is not None and (finish != "length" or tokens == max_tokens)
    return {"t0": t0, "ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "prompt_tokens": (usage or {}).get("prompt_tokens"), "text": text, "finish": finish, "whole": whole, "error": error,
            "end": time.perf_counter()}


async def _load(url, model, prompts, concurrency, requests, max_tokens, headers, system=None):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def bounded(i):
            async with sem:
                return await _one(client, url, model, prompts[i % len(prompts)], max_tokens, headers, system)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - t0


def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: int, prompts=PROMPTS,
             api_key: str | None = None, system: str | None = None) -> dict:
    """Run one load level; return its summary (and the per-request texts under `texts`). `system`: a
    system message every request starts with."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, wall = asyncio.run(_load(url, model, list(prompts), concurrency, requests, max_tokens, headers,
                                      system))
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results if r["error"] is None)
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "output_tok_s": tokens / wall,
            "req_s": requests / wall, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99),
            "errors": sum(r["error"] is not None for r in results),
            "incomplete": sum(not r["whole"] for r in results), "output_tokens": tokens,
            "mean_tokens": statistics.mean(r["tokens"] for r in results),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] or 0 for r in results),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "texts": [r["text"] for r in results]}
