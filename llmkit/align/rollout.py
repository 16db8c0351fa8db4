"""Rollouts for on-policy RL (GRPO, PPO): sample G completions per prompt with the inference engine
(batched prefill + KV-cache decode, `generate_batch`), then lay prompt + completion out as a training
batch and score it once with the model under no_grad for the "old" log-probs the PPO/GRPO ratio divides by.

    r = sample_rollouts(model, tok, prompts, group_size=8, params=SamplingParams(temperature=1.0, ...))
    r.idx, r.targets (N, L)   inputs / next tokens, -100 on prompt and padding (N = P·G rows, prompt-major)
    r.mask (N, L)             1 on the completion tokens the policy sampled
    r.old_logps (N, L)        their log-probs under the sampling policy (0 off the mask)

The old log-probs come from the same full forward the loss will run (`losses.sequence_logprobs`), not
from the decode loop's KV-cache logits, so before the first update the ratio is exactly 1 and GRPO's
clipping sees only the real policy change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import LLMKitError
from ..inference import SamplingParams, generate_batch
from ..losses import sequence_logprobs

IGNORE = -100


@dataclass
class Rollout:
    idx: torch.Tensor  # (N, L) inputs: prompt + completion, right-padded, shifted (last token dropped)
    targets: torch.Tensor  # (N, L) next tokens; IGNORE on prompt and padding
    mask: torch.Tensor  # (N, L) float, 1 on completion tokens
    old_logps: torch.Tensor  # (N, L) fp32 log-probs of the targets under the sampling policy
    texts: list[str] = field(default_factory=list)  # the completions' text (N,), for the reward functions
    prompt_index: list[int] = field(default_factory=list)  # (N,) which prompt each row answers
    lengths: list[int] = field(default_factory=list)  # (N,) completion tokens (with the end token)
    finish: list[str] = field(default_factory=list)  # (N,) "stop" | "length"

    def rows(self, sel) -> dict:
        """The tensors of rows `sel` (a slice or index tensor) as a batch dict."""
        return {"idx": self.idx[sel], "targets": self.targets[sel], "mask": self.mask[sel],
                "old_logps": self.old_logps[sel]}


def build_batch(prompts: list[list[int]], completions: list[list[int]],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion per row, right-padded: (idx, targets) (N, L) with targets = the next token
    on completion positions and IGNORE elsewhere (the prompt is given, not sampled). Causal attention
    makes right padding harmless: no real token attends to a pad after it."""
    if len(prompts) != len(completions):
        raise LLMKitError(f"{len(prompts)} prompts for {len(completions)} completions")
    L = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    idx = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), L), IGNORE, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c, dtype=torch.long)
        idx[b, : len(seq) - 1] = seq[:-1]
        targets[b, len(p) - 1: len(seq) - 1] = seq[len(p):]  # position t predicts token t+1
    return idx, targets


@torch.no_grad()
def batched_logprobs(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, micro_batch: int = 8,
                     autocast=None) -> torch.Tensor:
    """sequence_logprobs over micro-batches of rows without gradients: (N, L) fp32 on idx's device."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, idx.size(0), micro_batch):
        with autocast or contextlib.nullcontext():
            rows = slice(i, i + micro_batch)
            out.append(sequence_logprobs(model, idx[rows].to(dev), targets[rows].to(dev)).float())
    return torch.cat(out).to(idx.device)


def sample_rollouts(model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int,
                    params: SamplingParams, *, end_id: int | None = None, pad_id: int | None = None,
                    micro_batch: int = 8, autocast=None) -> Rollout:
    """G = group_size sampled completions for each prompt (token ids), as a training batch.

    Sampling stops at `end_id` (default: the tokenizer's eos, the end of an assistant turn for chat
    models), and that end token is kept as the completion's last token so the policy also learns when to
    stop; the engine leaves stop ids out of its output, hence a single stop id, known exactly. The
    model is put in eval mode for sampling and scoring (no dropout: the old log-probs are those of the
    deterministic policy) and back in its previous mode afterwards."""
    end_id = end_id if end_id is not None else tokenizer.eos_id
    if end_id is None:
        raise LLMKitError("the tokenizer has no eos token to end completions with: give end_id")
    pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer.pad_id is not None else end_id)
    params = dataclasses.replace(params, n=group_size, stop_ids=(end_id,), stop=())
    was = model.training
    model.eval()
    try:
        gens = generate_batch(model, prompts, params)
        rows_prompt, rows_comp, texts, index, lengths, finish = [], [], [], [], [], []
        for i, (p, g) in enumerate(zip(prompts, gens)):
            for c in g.completions:
                toks = list(c.tokens) + ([end_id] if c.finish_reason == "stop" else [])
                if not toks:  # max_new_tokens = 0 leaves nothing to learn from
                    raise LLMKitError("a rollout produced an empty completion: raise max_new_tokens")
                rows_prompt.append(list(p))
                rows_comp.append(toks)
                texts.append(tokenizer.decode(c.tokens, skip_special_tokens=True))
                index.append(i)
                lengths.append(len(toks))
                finish.append(c.finish_reason or "length")
        idx, targets = build_batch(rows_prompt, rows_comp, pad_id)
        old = batched_logprobs(model, idx, targets, micro_batch, autocast)
    finally:
        model.train(was)
    return Rollout(idx, targets, (targets != IGNORE).float(), old, texts, index, lengths, finish)
