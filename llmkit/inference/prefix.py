"""Prefix caching: the K/V of a prompt's leading tokens (a system prompt, few-shot examples)
computed once and reused by later prompts that start the same way.

K/V at position i depends only on tokens 0..i (causal attention), so the first m positions of
any stored prompt are valid for a new prompt sharing its first m tokens. Each generate stores
its prompt's K/V; a lookup takes the longest common prefix over the stored prompts (at most
len(prompt) - 1 tokens, since the last prompt token must run to give the next-token logits).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import LLMKitError


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """LRU store of prompts' K/V (L, K, n, D), with hit statistics.

    hits / misses count lookups; hit_tokens counts prompt tokens whose prefill was skipped.
    min_tokens: shorter common prefixes are not worth a copy and count as misses.
    """

    def __init__(self, max_entries: int = 8, min_tokens: int = 1):
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        self.hits = self.misses = self.hit_tokens = 0
        self._model_id: int | None = None

    def _check_model(self, model):
        if self._model_id is None:
            self._model_id = id(model)
        elif self._model_id != id(model):
            raise LLMKitError("this prefix cache belongs to another model; use one PrefixCache per model")

    def load(self, model, prompt: list[int], cache) -> int:
        """Copy the longest cached prefix of `prompt` into row 0.. of `cache`; return its length."""
        self._check_model(model)
        best, best_key = 0, None
        for key in self.entries:
            m = min(common_prefix(key, prompt), len(prompt) - 1)
            if m > best:
                best, best_key = m, key
        if best < self.min_tokens:
            self.misses += 1
            return 0
        self.entries.move_to_end(best_key)
        k, v = self.entries[best_key]
        cache.write(k[:, :, :best], v[:, :, :best])
        self.hits += 1
        self.hit_tokens += best
        return best

    def store(self, model, prompt: list[int], cache, row: int = 0):
        """Keep the K/V of the whole prompt (positions 0..len-1) of one cache row."""
        self._check_model(model)
        key = tuple(prompt)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = cache.read(len(prompt), row)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens, "entries": len(self.entries)}
