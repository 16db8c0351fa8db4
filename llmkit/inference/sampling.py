"""Decoding strategies, each a small pure function over logits (B, V) -> logits (B, V).

`process_logits` composes them in the order transformers' `generate` applies its logits
processors (penalties first, then temperature, top-k, top-p, min-p), and the semantics of each
match the transformers class named in its docstring on the same logits (tests check this).
Filtered-out tokens get -inf, so softmax of the result is the sampling distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LLMKitError


MAX_LOGPROBS = 20  # alternatives reported per token (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); >0 samples from softmax(logits / T)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + output (1 = off)
    frequency_penalty: float = 0.0  # OpenAI-style, over the output: - f * count
    presence_penalty: float = 0.0  # OpenAI-style, over the output: - p * [count > 0]
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()  # token ids that end a sequence (not included in the output)
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer; the output text is cut before them)
    seed: int | None = None
    n: int = 1  # samples per prompt
    logprobs: int = 0  # how many top alternatives to report per token (the chosen token's is always kept)
    min_tokens_to_keep: int = 1

    def __post_init__(self):
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        self.stop = tuple(self.stop)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN would pass the range checks below silently
                raise LLMKitError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise LLMKitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LLMKitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LLMKitError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise LLMKitError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise LLMKitError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise LLMKitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            raise LLMKitError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise LLMKitError(f"logprobs must be in [0, {MAX_LOGPROBS}] (as OpenAI's top_logprobs), got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise LLMKitError(f"seed must be in [0, 2^63), got {self.seed}")
        if any(not s for s in self.stop):
            raise LLMKitError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


# ---------------------------------------------------------------- penalties
def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for tokens already seen, divide positive logits by the penalty and
    multiply negative ones. seen: (B, V) bool. = transformers' RepetitionPenaltyLogitsProcessor."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                               presence: float) -> torch.Tensor:
    """OpenAI API penalties: logit - frequency * count - presence * [count > 0]; counts (B, V) of output tokens."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


# ---------------------------------------------------------------- warpers
def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits / T (= TemperatureLogitsWarper)."""
    return logits / t


def top_k(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th kept, as TopKLogitsWarper)."""
    k = min(max(k, min_keep), logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    mass reaches p. Drops tokens whose ascending cumulative mass is <= 1 - p (= TopPLogitsWarper)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -min_keep:] = False
    drop = drop.scatter(-1, order, drop)
    return logits.masked_fill(drop, float("-inf"))


def min_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens with prob < p * max prob (= MinPLogitsWarper)."""
    probs = logits.softmax(dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    order = torch.argsort(logits, descending=True, dim=-1)
    sorted_drop = drop.gather(-1, order)
    sorted_drop[..., :min_keep] = False
    drop = sorted_drop.scatter(-1, order, sorted_drop)
    return logits.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------- composition
def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits (B, V) -> the logits whose softmax is the sampling distribution (fp32).

    seen (B, V) bool: tokens of prompt + output (repetition penalty); counts (B, V): output token counts.
    With temperature 0 only the penalties apply (greedy takes the argmax of the result).
    """
    x = logits.float()
    if params.repetition_penalty != 1:
        x = repetition_penalty(x, seen, params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        x = frequency_presence_penalty(x, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return x
    if params.temperature != 1:
        x = temperature(x, params.temperature)
    if params.top_k:
        x = top_k(x, params.top_k, params.min_tokens_to_keep)
    if params.top_p < 1:
        x = top_p(x, params.top_p, params.min_tokens_to_keep)
    if params.min_p > 0:
        x = min_p(x, params.min_p, params.min_tokens_to_keep)
    return x


def probs_from_logits(processed: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution (B, V): softmax, or one-hot of the argmax when greedy."""
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.size(-1)).to(processed.dtype)
    return processed.softmax(dim=-1)


def sample(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row (B,) from processed logits (B, V)."""
    if params.greedy:
        return processed.argmax(dim=-1)
    return torch.multinomial(processed.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG so a seed reproduces a sample regardless of other torch randomness."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


@dataclass
class History:
    """Per-row token statistics the penalties need: seen (B, V) bool over prompt + output,
    counts (B, V) of output tokens. Empty tensors when no penalty is on (nothing to track)."""

    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    active: bool = field(default=False)

    @classmethod
    def start(cls, prompts: list[list[int]], vocab_size: int, params: SamplingParams) -> "History":
        if not params.uses_history:
            return cls()
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        for b, p in enumerate(prompts):
            if p:
                seen[b, torch.tensor(p)] = True
        return cls(seen, torch.zeros(len(prompts), vocab_size), True)

    def add(self, tokens: torch.Tensor):
        """tokens (B,) just emitted."""
        if self.active:
            self.seen[torch.arange(tokens.numel()), tokens] = True
            self.counts[torch.arange(tokens.numel()), tokens] += 1

    def clone(self) -> "History":
        if not self.active:
            return self
        return History(self.seen.clone(), self.counts.clone(), True)
