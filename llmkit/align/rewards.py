"""Verifiable rewards for RL on reasoning tasks (GRPO, PPO): plain functions
`(completion: str, example: dict) -> float` that check a completion instead of asking a reward model.

    correctness_reward  1 if the answer's last number equals the reference number (GSM8K: after "####")
    exact_match_reward  1 if the answer text equals the reference exactly (toy tasks)
    format_reward       1 if the completion is `<think>…</think>` followed by an answer (DeepSeek-R1 sec. 2.2.2)

"The answer" is what follows the closing </think> when there is one, else the whole completion, so a
number written inside the reasoning never counts as the answer. REWARDS names them for configs
(`rewards=correct,format`); a recipe sums the chosen ones.

A reward model is one more reward source (name "rm"): SOURCES holds the sources that must be loaded
first (from `reward_model`, a path), and `get_rewards` builds them with the run's context. A source may
also offer `score_batch(completions, examples)` (the RM scores a rollout in batches); `batch_rewards`
uses it when there, so the recipes never ask which kind of reward they hold.
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
    raise LLMKitError(f"a prompt has no 'answer' or 'target' to check against ({example.get('question', '')[:40]!r}...): "
                      "prompts without answers (preference data) need a reward model (--reward-model, rewards=rm)")


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


def reward_model_source(reward_model: str | None = None, tokenizer=None, device=None, batch_size: int = 8, **_):
    """The "rm" source: the reward model at `reward_model` (--reward-model), frozen on `device`."""
    from .reward import RewardModelReward

    if not reward_model:
        raise LLMKitError("reward 'rm' needs a reward model: give --reward-model DIR (from llmkit align --method rm)")
    return RewardModelReward.load(reward_model, tokenizer, device, batch_size)


# sources built from the run's context: name -> factory(**context) -> reward function
SOURCES = {"rm": reward_model_source}


def reward_names(names: list[str] | str) -> list[str]:
    """The names of "correct,format"-like specs, checked (no loading); an unknown name raises LLMKitError."""
    names = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
    known = {**REWARDS, **SOURCES}
    for n in names:
        if n not in known:
            raise LLMKitError(f"unknown reward {n!r}{closest(n, known)}; choose from {', '.join(known)}")
    if not names:
        raise LLMKitError(f"no reward function given; choose from {', '.join(known)}")
    return names


def get_rewards(names: list[str] | str, **context) -> dict:
    """{name: function} for names like "correct,format" or "rm"; the sources of SOURCES are built with
    `context` (reward_model=path, tokenizer=the policy's, device=..., batch_size=...)."""
    return {n: REWARDS[n] if n in REWARDS else SOURCES[n](**context) for n in reward_names(names)}


def batch_rewards(fn, completions: list[str], examples: list[dict]) -> list[float]:
    """One reward's values for a batch: the source's own batched scoring when it has one, else per completion."""
    score_batch = getattr(fn, "score_batch", None)
    if score_batch is not None:
        return [float(v) for v in score_batch(completions, examples)]
    return [float(fn(c, e)) for c, e in zip(completions, examples)]
