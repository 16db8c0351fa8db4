"""The inference engine: plain functions over token ids and a pre-allocated KV cache."""

from ..models.cache import BatchKVCache, RollingKVCache
from .generate import (Completion, Generation, TokenEvent, best_of_n, decode_step, generate, generate_batch,
                       iter_generate, mtp_generate, prefill, speculative_accept, speculative_generate, stream,
                       truncated_draft,
                       TextStream, check_prompt)
from .prefix import PrefixCache
from .quant import QuantLinear, quantize
from .sampling import SamplingParams, process_logits, sample

__all__ = ["BatchKVCache", "RollingKVCache", "Completion", "Generation", "TokenEvent", "best_of_n", "decode_step",
           "generate", "generate_batch", "iter_generate", "mtp_generate", "prefill", "speculative_accept", "speculative_generate",
           "stream", "TextStream", "check_prompt", "truncated_draft", "PrefixCache", "QuantLinear", "quantize", "SamplingParams", "process_logits", "sample"]
