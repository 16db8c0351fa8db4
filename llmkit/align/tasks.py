"""Prompt sets for RL with verifiable rewards: rows {"question", "answer"} turned into chat prompts.

    toy_arithmetic(n, seed)   2-3 digit addition word problems: learnable by a 135M model in minutes
    load_prompts(path)        rows with question|prompt|input and answer|target (GSM8K, SVAMP, ...), or the
                              prompts of preference records (llmkit.align.data formats: ShareGPT, HH, plain),
                              for a reward model to score; .jsonl, .json lists, gzipped too
    chat_prompt(tok, row)     the chat-templated prompt ids, asking for `<think>…</think>` then the answer

The system prompt is DeepSeek-R1-Zero's template (DeepSeek-AI 2025, table 1), shortened.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import LLMKitError

SYSTEM = ("You are a helpful assistant. First think about the reasoning process, then give the answer. "
          "The reasoning is enclosed within <think> </think> tags, followed by the final answer, "
          "e.g. <think> reasoning here </think> 42")

TOY = "toy-arithmetic"  # the data name that selects toy_arithmetic instead of a file
_NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Raj")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "cards", "shells", "pens")
_TEMPLATES = ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
              "There are {a} {item} in one box and {b} {item} in another. How many {item} are there in total?",
              "{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} did {name} collect?")


def toy_arithmetic(n: int, seed: int = 0, low: int = 10, high: int = 999) -> list[dict]:
    """n addition word problems with operands in [low, high] (2-3 digits), deterministic in seed:
    [{"question", "answer"}] with answer the sum as a string."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        q = rng.choice(_TEMPLATES).format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b)
        rows.append({"question": q, "answer": str(a + b)})
    return rows


def _normalise(row: dict, where: str) -> dict:
    """A prompt row -> {"question", "answer" (None when the row has none: only a reward model can score
    it), ["messages"]}. A preference record gives its prompt conversation (its replies are not used)."""
    if not isinstance(row, dict):
        raise LLMKitError(f"{where}: a prompt row must be a JSON object, got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        from .data import to_pair

        messages = to_pair(row, where)[0]
        users = [m["content"] for m in messages if m["role"] == "user"]
        return {"question": users[-1].strip(), "answer": None, "messages": messages}
    q = next((row[k] for k in ("question", "prompt", "input") if isinstance(row.get(k), str) and row[k].strip()), None)
    a = next((row[k] for k in ("answer", "target") if row.get(k) is not None), None)
    if q is None:
        raise LLMKitError(f"{where}: a prompt row needs question|prompt|input (or a preference record's "
                          f"prompt/chosen/rejected); got keys {', '.join(row) or 'none'}")
    return {**row, "question": q.strip(), "answer": None if a is None else str(a)}


def load_prompts(path: str | Path, max_records: int | None = None) -> list[dict]:
    """Rows of a JSONL/JSON(.gz) file as {"question", "answer", ...}; a bad row raises LLMKitError naming its line."""
    from ..finetune.data import read_records

    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"prompt file not found: {p}")
    rows = []
    for i, rec in read_records(p):
        rows.append(_normalise(rec, f"{p}:{i}"))
        if max_records and len(rows) >= max_records:
            break
    if not rows:
        raise LLMKitError(f"{p} holds no prompts")
    return rows


def chat_prompt(tokenizer, row: dict, system: str | None = SYSTEM, prefill: str = "") -> list[int]:
    """Token ids of the chat-templated prompt (system + user question, generation prompt added), followed by
    `prefill`: the start of the assistant's answer written for it (e.g. "<think>", as TinyZero does, so a
    small model starts in the format and RL has rewards to compare from the first rollout)."""
    messages = list(row["messages"]) if row.get("messages") else [{"role": "user", "content": row["question"]}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True) + prefill,
                            add_bos=False)
