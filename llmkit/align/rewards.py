"""Verifiable rewards for RL on reasoning tasks (GRPO, PPO): plain functions
`(completion: str, example: dict) -> float` that check a completion instead of asking a reward model.

    correctness_reward  1 if the answer's last number equals the reference number (GSM8K: after "####")
    exact_match_reward  1 if the answer text equals the reference exactly (toy tasks)
    format_reward       1 if the completion is `<think>…</think>` followed by an answer (DeepSeek-R1 sec. 2.2.2)

"The answer" is what follows the closing </think> when there is one, else the whole completion, so a
number written inside the reasoning never counts as the answer. REWARDS names them for configs
(`rewards=correct,format`); a recipe sums the chosen ones.
"""

from __future__ import annotations

import re

from ..errors import LLMKitError, closest
from ..eval.tasks import extract_number

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# one reasoning block, then an answer; no other think tag anywhere, nothing before the block but whitespace
_FORMAT = re.compile(r"\s*<think>(?P<reasoning>(?:(?!</?think>).)*)</think>(?P<answer>(?:(?!</?think>).)*)", re.DOTALL)


def answer_part(completion: str) -> str:
    """The text after the last </think> (the answer), or the whole completion when there is none."""
    return completion.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in completion else completion


def reference_answer(example: dict) -> str:
    """The gold answer of a row: "answer" (GSM8K's solution ending in "#### N", or a bare answer) or "target"."""
    for key in ("answer", "target"):
        if key in example and example[key] is not None:
            ref = str(example[key])
            return ref.split("####")[-1].strip() if "####" in ref else ref.strip()
    raise LLMKitError(f"example has no 'answer' or 'target' to check against (keys: {', '.join(example)})")


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def correctness_reward(completion: str, example: dict) -> float:
    """1.0 when the last number of the answer equals the reference number ("72" = "72.0" = "#### 72"), else 0."""
    return float(_same_number(extract_number_last(answer_part(completion)), extract_number(reference_answer(example))))


def extract_number_last(text: str) -> str | None:
    """The last number in text (commas and a trailing '.' dropped); `extract_number` without the "####" rule,
    which belongs to references, not to what a model wrote."""
    return extract_number(text.replace("####", " "))


def exact_match_reward(completion: str, example: dict) -> float:
    """1.0 when the answer text, stripped, is exactly the reference."""
    return float(answer_part(completion).strip() == reference_answer(example))


def format_reward(completion: str, example: dict | None = None) -> float:
    """1.0 for `<think> reasoning </think> answer` (one non-empty reasoning block, then a non-empty answer)."""
    m = _FORMAT.fullmatch(completion)
    return float(m is not None and bool(m["reasoning"].strip()) and bool(m["answer"].strip()))


REWARDS = {"correct": correctness_reward, "exact": exact_match_reward, "format": format_reward}


def get_rewards(names: list[str] | str) -> dict:
    """{name: function} for names like "correct,format"; an unknown name raises LLMKitError."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for n in names:
        if n not in REWARDS:
            raise LLMKitError(f"unknown reward {n!r}{closest(n, REWARDS)}; choose from {', '.join(REWARDS)}")
    if not names:
        raise LLMKitError(f"no reward function given; choose from {', '.join(REWARDS)}")
    return {n: REWARDS[n] for n in names}
