"""Preference data: records -> (prompt messages, chosen reply, rejected reply) -> token ids -> padded batches.

Record formats (JSON lines, or a JSON list; gzip-compressed files too), detected per record:
  plain      {"prompt": str, "chosen": str, "rejected": str}
  chat       {"prompt": [{"role", "content"}, ...] | str, "chosen": ..., "rejected": ...} where chosen/rejected
             are strings, one message, or a list of messages whose last is the assistant reply
  ShareGPT   {"conversations": [{"from", "value"}, ...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
             (LLaMA-Factory's dpo_en_demo.json)
  Anthropic HH  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."} (Bai et al. 2022): two whole
             transcripts; the prompt is their longest shared prefix cut at its last "\\n\\nAssistant:", since the
             two replies may themselves start alike.

Every pair is rendered with the tokenizer's chat template: the prompt with the generation prompt
(`<|im_start|>assistant\\n`), each reply as the rest of the rendering of prompt + [assistant reply] (so it
ends with the end-of-turn token). Prompt and replies are tokenised separately and concatenated, as the
policy generates a reply after the prompt's ids (TRL does the same): both sides share the prompt's ids
exactly. Labels are -100 on the prompt, so every response log-prob (DPO, PPO) and the reward's pooling
(the last non-pad token) see the reply only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import LLMKitError
from ..finetune.data import IGNORE, SHAREGPT_ROLES, parse_file_specs, read_records

log = logging.getLogger(__name__)
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


# ------------------------------------------------------------------ reading records (finetune.data.read_records)
def _reply(value, where: str, field: str) -> str:
    """A reply given as a string, one message ({"role"/"from", "content"/"value"}) or a list ending in one."""
    if isinstance(value, list):
        if not value:
            raise LLMKitError(f"{where}: {field!r} is an empty list")
        value = value[-1]
    if isinstance(value, dict):
        text = value.get("content", value.get("value"))
        if not isinstance(text, str):
            raise LLMKitError(f"{where}: {field!r} message needs a string 'content' (or 'value')")
        return text
    if not isinstance(value, str):
        raise LLMKitError(f"{where}: {field!r} must be a string or a message, got {type(value).__name__}")
    return value


def split_hh(chosen: str, rejected: str, where: str) -> tuple[list[dict], str, str]:
    """Anthropic HH transcripts -> (prompt messages, chosen reply, rejected reply). The prompt ends at the
    last "\\n\\nAssistant:" of the two transcripts' common prefix."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen[:n].rfind(HH_ASSISTANT)
    if cut < 0:
        raise LLMKitError(f"{where}: the chosen and rejected transcripts share no '\\n\\nHuman: ... \\n\\nAssistant:' "
                          "prompt (Anthropic HH format)")
    messages, role, rest = [], None, chosen[:cut]
    while rest:
        h, a = rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)
        nxt = min(i for i in (h, a, len(rest)) if i >= 0)
        if role is not None:
            messages.append({"role": role, "content": rest[:nxt].strip()})
        elif rest[:nxt].strip():
            raise LLMKitError(f"{where}: HH transcript must start with '\\n\\nHuman:'")
        if nxt == len(rest):
            break
        role = "user" if nxt == h else "assistant"
        rest = rest[nxt + len(HH_HUMAN if nxt == h else HH_ASSISTANT):]
    if not messages or messages[-1]["role"] != "user":
        raise LLMKitError(f"{where}: HH prompt must end with a Human turn before the last Assistant:")
    k = cut + len(HH_ASSISTANT)
    return messages, chosen[k:].strip(), rejected[k:].strip()


def to_pair(rec: dict, where: str, system: str | None = None) -> tuple[list[dict], str, str]:
    """One record of any supported format -> (prompt messages, chosen reply, rejected reply)."""
    for f in ("chosen", "rejected"):
        if rec.get(f) is None:
            raise LLMKitError(f"{where}: record has no {f!r} field (preference records need prompt, chosen, rejected)")
    if "conversations" in rec or "messages" in rec:
        prompt = _prompt_messages(rec, where)
    elif "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        elif isinstance(p, list):
            prompt = _prompt_messages({"messages": p}, where)
        else:
            raise LLMKitError(f"{where}: 'prompt' must be a string or a list of messages")
    elif isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
        prompt, chosen, rejected = split_hh(rec["chosen"], rec["rejected"], where)
        return _finish(prompt, chosen, rejected, where, system)
    else:
        raise LLMKitError(f"{where}: record has no 'prompt' (or 'conversations') field "
                          f"(fields {', '.join(sorted(rec))})")
    return _finish(prompt, _reply(rec["chosen"], where, "chosen"), _reply(rec["rejected"], where, "rejected"),
                   where, system)


def _prompt_messages(rec: dict, where: str) -> list[dict]:
    """ShareGPT `conversations` or chat `messages` -> [{"role", "content"}] (the prompt: it may have no
    assistant turn yet, which finetune.data.to_messages would refuse)."""
    key = "conversations" if "conversations" in rec else "messages"
    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise LLMKitError(f"{where}: {key!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(turns):
        role = m.get("from", m.get("role")) if isinstance(m, dict) else None
        text = m.get("value", m.get("content")) if isinstance(m, dict) else None
        if role is None or not isinstance(text, str):
            raise LLMKitError(f"{where}: {key}[{j}] needs a speaker and a string text")
        mapped = SHAREGPT_ROLES.get(str(role).lower())
        if mapped is None:
            raise LLMKitError(f"{where}: {key}[{j}] has unknown speaker {role!r} (known: {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": mapped, "content": text})
    return out


def _finish(prompt: list[dict], chosen: str, rejected: str, where: str, system: str | None):
    if chosen == rejected:
        raise LLMKitError(f"{where}: chosen and rejected replies are identical (a pair must differ)")
    if prompt[-1]["role"] == "assistant":
        raise LLMKitError(f"{where}: the prompt ends with an assistant turn; the last prompt turn must be the user's")
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen, rejected


# ------------------------------------------------------------------ tokenising
class PreferencePair(NamedTuple):
    """One tokenised pair; unpacks as (prompt_ids, chosen_ids, rejected_ids)."""

    prompt_ids: list[int]  # chat-templated prompt, ending with the generation prompt
    chosen_ids: list[int]  # the chosen reply's tokens (end-of-turn included)
    rejected_ids: list[int]


def tokenize_pair(tok, prompt: list[dict], chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """Render with the chat template; -> (prompt ids, chosen ids, rejected ids)."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True)
    out = [tok.encode(head)]
    for reply in (chosen, rejected):
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}])
        if not full.startswith(head):
            raise LLMKitError("the chat template does not render the prompt as a prefix of prompt + reply; "
                              "cannot separate the reply")
        out.append(tok.encode(full[len(head):], add_bos=False))
    return out[0], out[1], out[2]


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    val: list[PreferencePair]
    files: list[str]
    dropped: int = 0  # pairs whose prompt leaves no room for a reply within seq_len
    truncated: int = 0  # pairs with a reply cut to fit seq_len


def load_preference_data(files, tok, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                         system: str | None = None, max_records: int | None = None) -> PreferenceData:
    """Read, render, tokenise and split every file (a fixed fraction of each held out). A pair longer than
    seq_len tokens has its replies cut to fit; one whose prompt alone takes seq_len is dropped and counted."""
    if not 0 <= val_fraction < 1:
        raise LLMKitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val, dropped, truncated, names = [], [], 0, 0, []
    for path, _ in parse_file_specs(files):
        names.append(str(path))
        records = read_records(path)[: max_records or None]
        pairs = []
        for row, rec in records:
            where = f"{path}:{row}"
            p, c, r = tokenize_pair(tok, *to_pair(rec, where, system))
            room = seq_len - len(p)
            if room < 1:
                dropped += 1
                if dropped <= 3:
                    log.warning("%s: prompt of %d tokens leaves no room for a reply in seq_len %d: skipped",
                                where, len(p), seq_len)
                continue
            if len(c) > room or len(r) > room:
                truncated += 1
                c, r = c[:room], r[:room]
            pairs.append(PreferencePair(p, c, r))
        if not pairs:
            raise LLMKitError(f"{path}: no preference pairs fit seq_len {seq_len} ({dropped} prompts too long)")
        random.Random(seed).shuffle(pairs)
        n_val = int(round(len(pairs) * val_fraction))
        if val_fraction > 0 and len(pairs) > 1:
            n_val = max(1, n_val)
        val += pairs[:n_val]
        if not pairs[n_val:]:
            raise LLMKitError(f"{path}: no training pairs left after the validation split")
        train += pairs[n_val:]
    if dropped:
        log.warning("dropped %d preference pairs whose prompt does not fit seq_len %d", dropped, seq_len)
    return PreferenceData(train, val, names, dropped, truncated)


# ------------------------------------------------------------------ batching
def preference_batch(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B rows: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, right-padded.

    idx (2B, L): the whole sequences (a reward model reads them whole);
    targets (2B, L): targets[:, t] = idx[:, t+1] on reply tokens, -100 on the prompt, padding and the last
      column, so `losses.sequence_logprobs(model, idx, targets).sum(-1)` is each reply's log-likelihood;
    lengths (2B,): real tokens per row (the reward is read at lengths - 1);
    prompt_lengths (2B,)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    L = max(len(a) + len(b) for a, b in rows)
    idx = torch.full((len(rows), L), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    lengths, plens = [], []
    for i, (prompt, reply) in enumerate(rows):
        ids = prompt + reply
        n, k = len(ids), len(prompt)
        idx[i, :n] = torch.tensor(ids)
        if n > k:  # position t predicts token t+1: the reply tokens k..n-1 are predicted from k-1..n-2
            tgt[i, k - 1:n - 1] = torch.tensor(reply)
        lengths.append(n)
        plens.append(k)
    return {"idx": idx, "targets": tgt, "lengths": torch.tensor(lengths), "prompt_lengths": torch.tensor(plens)}
