"""Prompt sets for RL with verifiable rewards: rows {"question", "answer"} turned into chat prompts.

    toy_arithmetic(n, seed)   2-3 digit addition word problems: learnable by a 135M model in minutes
    load_prompts(path)        JSONL rows with question|prompt|input and answer|target (GSM8K, SVAMP, ...)
    chat_prompt(tok, row)     the chat-templated prompt ids, asking for `<think>…</think>` then the answer

The system prompt is DeepSeek-R1-Zero's template (DeepSeek-AI 2025, table 1), shortened.
"""

from __future__ import annotations

import json
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
    q = next((row[k] for k in ("question", "prompt", "input") if isinstance(row.get(k), str) and row[k].strip()), None)
    a = next((row[k] for k in ("answer", "target") if row.get(k) is not None), None)
    if q is None or a is None:
        raise LLMKitError(f"{where}: a prompt row needs question|prompt|input and answer|target "
                          f"(got keys {', '.join(row) or 'none'})")
    return {**row, "question": q.strip(), "answer": str(a)}


def load_prompts(path: str | Path, max_records: int | None = None) -> list[dict]:
    """Rows of a JSONL file as {"question", "answer", ...}; a row lacking either raises LLMKitError naming its line."""
    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"prompt file not found: {p}")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise LLMKitError(f"{p}:{i} is not JSON ({e})") from None
        rows.append(_normalise(row, f"{p}:{i}"))
        if max_records and len(rows) >= max_records:
            break
    if not rows:
        raise LLMKitError(f"{p} holds no prompts")
    return rows


def chat_prompt(tokenizer, row: dict, system: str | None = SYSTEM, prefill: str = "") -> list[int]:
    """Token ids of the chat-templated prompt (system + user question, generation prompt added), followed by
    `prefill`: the start of the assistant's answer written for it (e.g. "<think>", as TinyZero does, so a
    small model starts in the format and RL has rewards to compare from the first rollout)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": row["question"]})
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True) + prefill,
                            add_bos=False)
