"""Preference pairs for DPO/IPO: (prompt, chosen, rejected) as token ids, and their batches.

A minimal version with the interface the alignment recipes use (helper A's fuller loader keeps
these names): records are plain {"prompt", "chosen", "rejected"} strings, or ShareGPT-style
{"conversations": [...], "chosen": {"from", "value"}, "rejected": {...}} as in dpo_en_demo.json.
The prompt is the conversation rendered with the chat template and the generation prompt; each
response is the rest of the rendering with the response as the assistant turn (so it ends with
the end-of-turn token), tokenised on its own as trl does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import LLMKitError
from ..finetune.data import IGNORE, parse_file_specs, read_records, to_messages


@dataclass
class PreferenceData:
    train: list[tuple[list[int], list[int], list[int]]]  # (prompt_ids, chosen_ids, rejected_ids)
    val: list[tuple[list[int], list[int], list[int]]]
    files: list[str]
    dropped: int = 0  # pairs whose prompt left no room for a response within seq_len


def _response_text(value, where: str, side: str) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise LLMKitError(f"{where}: {side!r} must be a string or a {{'from', 'value'}} turn")
    return value


def _pair(rec: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of one record."""
    for side in ("chosen", "rejected"):
        if side not in rec:
            raise LLMKitError(f"{where}: preference record has no {side!r} field")
    if "conversations" in rec:
        prompt = to_messages({"conversations": rec["conversations"] + [{"from": "gpt", "value": ""}]}, where)[:-1]
    elif isinstance(rec.get("prompt"), str):
        prompt = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise LLMKitError(f"{where}: preference record needs 'prompt' or 'conversations'")
    chosen, rejected = _response_text(rec["chosen"], where, "chosen"), _response_text(rec["rejected"], where,
                                                                                      "rejected")
    if chosen == rejected:
        raise LLMKitError(f"{where}: chosen and rejected responses are identical")
    return prompt, chosen, rejected


def encode_pair(tok, prompt: list[dict], chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    p_text = tok.apply_chat_template(prompt, add_generation_prompt=True)
    out = [tok.encode(p_text)]
    for resp in (chosen, rejected):
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": resp}])
        if not full.startswith(p_text):
            raise LLMKitError("the chat template does not render the prompt as a prefix of the conversation")
        out.append(tok.encode(full[len(p_text):], add_bos=False))
    return out[0], out[1], out[2]


def load_preference_data(files, tokenizer, seq_len: int, val_fraction: float = 0.05,
                         seed: int = 0) -> PreferenceData:
    """Read, render and tokenise every file; responses are cut so prompt + response <= seq_len + 1
    tokens; a shuffled `val_fraction` of the pairs is held out."""
    if not 0 <= val_fraction < 1:
        raise LLMKitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pairs, dropped = [], 0
    for path, _ in parse_file_specs(files):
        for line, rec in read_records(path):
            p, c, r = encode_pair(tokenizer, *_pair(rec, f"{path}:{line}"))
            room = seq_len + 1 - len(p)
            if room < 2:  # no response token would be scored
                dropped += 1
                continue
            pairs.append((p, c[:room], r[:room]))
    if not pairs:
        raise LLMKitError(f"no preference pairs fit data.seq_len={seq_len} (every prompt is longer)")
    random.Random(seed).shuffle(pairs)
    n_val = max(1, round(len(pairs) * val_fraction)) if val_fraction > 0 and len(pairs) > 1 else 0
    return PreferenceData(pairs[n_val:], pairs[:n_val], [str(p) for p, _ in parse_file_specs(files)], dropped)


def preference_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> {"idx": (2B, T), "targets": (2B, T)}: rows 0..B-1 prompt + chosen, rows B..2B-1
    prompt + rejected (trl's [chosen, rejected] order); targets are the next tokens on response
    positions and IGNORE (-100) on the prompt and padding, so sequence_logprobs(...).sum(-1) is each
    response's log-likelihood."""
    rows = [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples]
    T = max(len(p) + len(x) for p, x in rows) - 1
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (p, x) in enumerate(rows):
        ids = p + x
        idx[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        tgt[b, len(p) - 1:len(ids) - 1] = torch.tensor(x)
    return {"idx": idx, "targets": tgt}
