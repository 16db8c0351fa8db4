"""Prompting: zero-, one- and few-shot prompts, chain-of-thought, answer extraction and
self-consistency, as plain functions over text plus one `solve` loop that calls the inference engine.

    select_shots(pool, k, how, ...)   which worked examples go in the prompt: "first", "random",
                                      "balanced" (round-robin over labels) or "similar" (nearest to the
                                      query by an `embed(texts) -> (N, D) tensor` callable; Liu et al.
                                      2022, "What Makes Good In-Context Examples for GPT-3?": the most
                                      similar shot goes last, next to the question)
    build_prompt(q, shots, style)     plain text ("Question: ...\\nAnswer: ...", shots separated by a blank
                                      line) or chat messages (a system instruction, then each shot as a
                                      user/assistant turn, then the question)
    METHODS                           the registered reasoning methods, one `Method` record each:
      zero-shot the question only, answered directly ("The answer is N.")
      direct    shots answer with "The answer is N." only (alias: few-shot)
      cot       zero-shot chain of thought: the answer starts "Let's think step by step." (Kojima et
                al. 2022, "Large Language Models are Zero-Shot Reasoners")
      cot-fewshot  worked solutions as shots (Wei et al. 2022, "Chain-of-Thought Prompting"), from
                GSM8K train with the <<calculator>> annotations removed and "#### N" -> "The answer is N."
      sc        cot-fewshot sampled k times at temperature T, majority vote over the extracted
                answers (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning")
      pal       the model writes a Python program; the sandbox runs it (llmkit/apps/pal.py)
    extract_answer(text)              the final number: after "The answer is", "####" or \\boxed{}, else
                                      the last number in the text
    majority_vote(answers)            the most frequent non-empty answer; a tie goes to the answer that
                                      reached the top count first (deterministic, and it prefers the
                                      earlier samples, which is what a greedy first path would give)
    solve(model, tok, questions, ...) -> one `Solution` per question (prediction, votes, outputs)

Everything that touches the model is in `solve`; the rest is text in, text out, and tested as such.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LLMKitError, closest

SEP = "\n\n"
ZERO_SHOT_COT = "Let's think step by step."
DIRECT_INSTRUCTION = "Answer the math word problem. Reply with the final number only, as: The answer is N."
COT_INSTRUCTION = ("Solve the math word problem step by step, then give the final number as: The answer is N.")


# ---------------------------------------------------------------- examples and their selection
@dataclass
class Shot:
    """A worked example: the question, its full answer text (a rationale or just the answer), the final
    answer, and a label for balanced selection (defaults to the final answer)."""
    question: str
    solution: str
    answer: str
    label: str | None = None


def clean_gsm8k_solution(text: str) -> tuple[str, str]:
    """GSM8K's "... <<48/2=24>>24 ...\\n#### 72" -> ("... 24 ...\\nThe answer is 72.", "72")."""
    body, _, final = text.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    final = final.strip().replace(",", "")
    return f"{body}\nThe answer is {final}.", final


def gsm8k_shots(path: str | Path, n: int | None = None) -> list[Shot]:
    """Worked examples from a GSM8K-format file ({"question", "answer" ending in "#### N"})."""
    from ..eval.tasks import read_jsonl

    return shots_from_rows(read_jsonl(Path(path))[:n], str(path))


def shots_from_rows(rows: list[dict], where: str = "shots") -> list[Shot]:
    """GSM8K-format rows (as read_jsonl gives them) -> Shots; `llmkit eval` passes its task's train split."""
    shots = []
    for row in rows:
        if "####" not in str(row.get("answer", "")):
            raise LLMKitError(f"{where}: line {row.get('_line', '?')} has no '#### N' answer")
        sol, final = clean_gsm8k_solution(row["answer"])
        shots.append(Shot(row["question"].strip(), sol, final))
    return shots


def select_shots(pool: list[Shot], k: int, how: str = "random", query: str | None = None,
                 embed: Callable | None = None, seed: int = 0) -> list[Shot]:
    """k examples from `pool` chosen by `how` (see the module docstring)."""
    if k < 0:
        raise LLMKitError(f"number of shots must be >= 0, got {k}")
    if k == 0:
        return []
    if len(pool) < k:
        raise LLMKitError(f"asked for {k} shots but the pool has only {len(pool)} examples")
    if how == "first":
        return pool[:k]
    if how == "random":
        return random.Random(seed).sample(pool, k)
    if how == "balanced":
        # round-robin over labels (in order of first appearance), each label's examples shuffled
        rng = random.Random(seed)
        by: dict[str, list[Shot]] = {}
        for s in pool:
            by.setdefault(s.label if s.label is not None else s.answer, []).append(s)
        for v in by.values():
            rng.shuffle(v)
        out, i = [], 0
        while len(out) < k:
            for v in by.values():
                if i < len(v) and len(out) < k:
                    out.append(v[i])
            i += 1
        return out
    if how == "similar":
        if embed is None or query is None:
            raise LLMKitError("similar shot selection needs a query and an embed(texts) function")
        import torch

        e = embed([query] + [s.question for s in pool])  # (1 + N, D)
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sims = e[1:] @ e[0]  # (N,) cosine similarity to the query
        top = torch.topk(sims, k).indices.tolist()  # most similar first
        return [pool[i] for i in reversed(top)]  # ... and last in the prompt, next to the question
    raise LLMKitError(f"unknown shot selection {how!r}{closest(how, SELECTIONS)}; choose from {', '.join(SELECTIONS)}")


SELECTIONS = ("first", "random", "balanced", "similar")


def sentence_embedder(model_dir: str | Path | None = None, batch_size: int = 64) -> Callable:
    """embed(texts) -> (N, 384) unit vectors from all-MiniLM-L6-v2 through llmkit's encoder: RAG's embedder
    (llmkit.rag.embeddings, equal to sentence-transformers), as a torch tensor for shot selection."""
    import torch

    from ..rag.embeddings import Embedder

    embedder = Embedder(model_dir, batch_size=batch_size)
    return lambda texts: torch.from_numpy(embedder.embed(list(texts)))


# ---------------------------------------------------------------- prompts
@dataclass
class PromptStyle:
    instruction: str = ""  # the system message (chat) or the first paragraph (plain)
    question_prefix: str = "Question: "
    answer_prefix: str = "Answer:"  # plain prompts end with this; the model continues after it
    answer_start: str = ""  # text the answer is made to start with (zero-shot CoT's trigger)
    shot_answer: str = "solution"  # which field of a Shot is shown: "solution" or "final" ("The answer is N.")


def _shot_answer(s: Shot, style: PromptStyle) -> str:
    return s.solution if style.shot_answer == "solution" else f"The answer is {s.answer}."


def build_prompt(question: str, shots: list[Shot], style: PromptStyle, tokenizer=None, chat: bool = False) -> str:
    """The prompt text. chat=True renders messages through the tokenizer's chat template and ends with the
    assistant's turn open (plus `answer_start`, so the model continues the trigger phrase)."""
    q = question.strip()
    if chat:
        if tokenizer is None:
            raise LLMKitError("a chat prompt needs a tokenizer (its chat template)")
        msgs = [{"role": "system", "content": style.instruction}] if style.instruction else []
        for s in shots:
            msgs += [{"role": "user", "content": s.question}, {"role": "assistant", "content": _shot_answer(s, style)}]
        msgs.append({"role": "user", "content": q})
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True) + style.answer_start
    parts = [style.instruction] if style.instruction else []
    parts += [f"{style.question_prefix}{s.question}\n{style.answer_prefix} {_shot_answer(s, style)}" for s in shots]
    tail = f"{style.question_prefix}{q}\n{style.answer_prefix}"
    parts.append(tail + (" " + style.answer_start if style.answer_start else ""))
    return SEP.join(parts)


# ---------------------------------------------------------------- answers
_NUM = r"-?\$?\s?[\d,]*\.?\d+"


def normalize_number(s: str) -> str | None:
    """'$1,000.50' -> '1000.5'; '18.0' -> '18'; None if no number."""
    m = re.search(r"-?[\d,]*\.?\d+", s.replace("$", ""))
    if not m:
        return None
    num = m.group(0).replace(",", "")
    if num in ("", "-", "."):
        return None
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    if num.startswith("-") and num.strip("-0.") == "":
        num = "0"
    return num or "0"


def extract_answer(text: str | None) -> str | None:
    """The final number of a model's answer (see the module docstring for the order of the rules)."""
    if not text:
        return None
    for pat in (r"[Tt]he (?:final )?answer is[:\s]*(" + _NUM + ")", r"####\s*(" + _NUM + ")",
                r"\\boxed\{\s*(" + _NUM + r")\s*\}"):
        found = re.findall(pat, text)
        if found:
            return normalize_number(found[-1])
    found = re.findall(_NUM, text)
    return normalize_number(found[-1]) if found else None


def same_answer(pred: str | None, gold: str | None) -> bool:
    """Numeric equality when both parse ('18' == '18.0'), else string equality."""
    if pred is None or gold is None:
        return False
    try:
        return abs(float(pred) - float(gold)) < 1e-6
    except ValueError:
        return pred == gold


def majority_vote(answers: list[str | None]) -> tuple[str | None, dict[str, int]]:
    """(winner, counts). None answers do not vote; ties go to the answer that reached the top count
    first in sample order; no answers at all -> (None, {})."""
    counts: Counter = Counter()
    best, best_n = None, 0
    for a in answers:
        if a is None:
            continue
        counts[a] += 1
        if counts[a] > best_n:  # strictly more: an equal count later never takes over
            best, best_n = a, counts[a]
    return best, dict(counts)


# ---------------------------------------------------------------- methods
@dataclass
class Method:
    """A reasoning method: how its prompt looks, how many samples it draws and at what temperature, and
    how an output becomes an answer. `run` replaces the generic generate-and-extract step (PAL)."""
    name: str
    style: PromptStyle
    default_shots: int
    samples: int = 1
    temperature: float = 0.0
    stop: tuple[str, ...] = ("\n\nQuestion:", "Question:")
    run: Callable | None = None  # (outputs, cfg) -> (answers, extra); default: extract_answer, no extra
    fixed_shots: list[Shot] | None = None  # the method's own exemplars (PAL's programs) instead of the pool
    help: str = ""


METHODS: dict[str, Method] = {
    "zero-shot": Method("zero-shot", PromptStyle(DIRECT_INSTRUCTION), 0, help="the question only, answer directly"),
    "direct": Method("direct", PromptStyle(DIRECT_INSTRUCTION, shot_answer="final"), 4,
                     help="shots answer with the number only"),
    "cot": Method("cot", PromptStyle(COT_INSTRUCTION, answer_start=ZERO_SHOT_COT), 0,
                  help='zero-shot chain of thought: "Let\'s think step by step."'),
    "cot-fewshot": Method("cot-fewshot", PromptStyle(COT_INSTRUCTION), 4, help="worked solutions as shots"),
    "sc": Method("sc", PromptStyle(COT_INSTRUCTION), 4, samples=5, temperature=0.7,
                 help="self-consistency: k sampled chains of thought, majority vote"),
}


ALIASES = {"few-shot": "direct"}  # the names `llmkit eval --prompting` offers beside the records' own


def get_method(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name == "pal" and "pal" not in METHODS:
        from .pal import PAL_METHOD

        METHODS["pal"] = PAL_METHOD
    if name not in METHODS:
        names = sorted(set(METHODS) | set(ALIASES) | {"pal"})
        raise LLMKitError(f"unknown method {name!r}{closest(name, names)}; choose from {', '.join(names)}")
    return METHODS[name]


@dataclass
class SolveConfig:
    method: str = "cot-fewshot"
    shots: int | None = None  # None: the method's default
    select: str = "first"  # first | random | balanced | similar
    chat: bool = True
    samples: int | None = None  # None: the method's (self-consistency: 5)
    temperature: float | None = None
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8  # prompts decoded together
    sandbox_timeout_s: float = 5.0  # PAL


@dataclass
class Solution:
    question: str
    prompt: str
    outputs: list[str]
    answers: list[str | None]
    prediction: str | None
    votes: dict[str, int] = field(default_factory=dict)
    extra: list = field(default_factory=list)  # per output, e.g. PAL's sandbox results

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def make_prompts(questions: list[str], pool: list[Shot], cfg: SolveConfig, tokenizer=None,
                 embed: Callable | None = None) -> list[str]:
    m = get_method(cfg.method)
    k = m.default_shots if cfg.shots is None else cfg.shots
    pool = m.fixed_shots if m.fixed_shots is not None else pool
    return [build_prompt(q, select_shots(pool, k, cfg.select, q, embed, seed=cfg.seed + i), m.style, tokenizer,
                         cfg.chat) for i, q in enumerate(questions)]


def sampling(cfg: SolveConfig) -> tuple[int, float]:
    """(samples per question, temperature) of cfg: its own values, else the method's; k > 1 greedy paths
    would all be equal, so that is an error (checked before any model loads)."""
    m = get_method(cfg.method)
    n = m.samples if cfg.samples is None else cfg.samples
    temp = m.temperature if cfg.temperature is None else cfg.temperature
    if n < 1:
        raise LLMKitError(f"samples must be >= 1, got {n}")
    if n > 1 and temp == 0:
        raise LLMKitError(f"{n} samples at temperature 0 would all be the same; give a temperature > 0")
    return n, temp


def solve(model, tokenizer, questions: list[str], pool: list[Shot], cfg: SolveConfig, embed: Callable | None = None,
          progress: bool = False, prompts: list[str] | None = None) -> list[Solution]:
    """Answer each question with `cfg.method`: build the prompts (unless given, as `make_prompts` made them),
    decode (greedy, or k samples per prompt), turn every output into an answer and vote."""
    from ..inference import SamplingParams, generate_batch
    from ..progress import progress_bar

    m = get_method(cfg.method)
    n, temp = sampling(cfg)
    if prompts is None:
        prompts = make_prompts(questions, pool, cfg, tokenizer, embed)
    elif len(prompts) != len(questions):
        raise ValueError("one prompt per question")
    stop = () if cfg.chat else m.stop
    params = SamplingParams(temperature=temp, top_p=cfg.top_p if temp > 0 else 1.0, max_new_tokens=cfg.max_new_tokens,
                            stop_ids=tuple(tokenizer.stop_ids), stop=stop, n=n, seed=cfg.seed)
    start = m.style.answer_start if cfg.chat else ""
    out: list[Solution] = []
    bar = progress_bar(len(prompts), desc=cfg.method, unit="q", enabled=progress)
    for s in range(0, len(prompts), cfg.batch_size):
        ids = [tokenizer.encode(p, add_bos=False) for p in prompts[s:s + cfg.batch_size]]
        for j, g in enumerate(generate_batch(model, ids, params, tokenizer=tokenizer)):
            texts = [start + c.text for c in g.completions]
            extra = []
            if m.run is not None:
                answers, extra = m.run(texts, cfg)
            else:
                answers = [extract_answer(t) for t in texts]
            pred, votes = majority_vote(answers)
            out.append(Solution(questions[s + j], prompts[s + j], texts, answers, pred, votes, extra))
        bar.update(len(ids))
    bar.close()
    return out


# ---------------------------------------------------------------- data sets
def load_math(name_or_path: str, limit: int | None = None, root: Path | None = None) -> list[dict]:
    """[{"question", "answer"}] of gsm8k (test), svamp, or a JSONL file with question|input and answer|target
    (GSM8K answers keep only the number after ####)."""
    from ..eval.tasks import find_data, read_jsonl

    files = {"gsm8k": "math/gsm8k_test.jsonl", "svamp": "math/svamp.jsonl"}
    path = find_data(files[name_or_path], name_or_path, root) if name_or_path in files else Path(name_or_path)
    rows = []
    for r in read_jsonl(path)[:limit]:
        q = r.get("question") or (f"{r.get('Body', '')} {r['Question']}".strip() if "Question" in r else r.get("input"))
        a = r.get("answer", r.get("target"))
        if not isinstance(q, str) or a is None:
            raise LLMKitError(f"{path}: line {r['_line']} needs question|input and answer|target")
        a = str(a)
        a = a.split("####")[-1] if "####" in a else a
        rows.append({"question": q.strip(), "answer": normalize_number(a) or a.strip()})
    return rows


def default_pool(root: Path | None = None, n: int = 200) -> list[Shot]:
    """Worked examples for the shots: the first n of GSM8K train (shared data folder, else the packaged subset)."""
    from ..eval.tasks import find_data

    return gsm8k_shots(find_data("math/gsm8k_train.jsonl", "gsm8k", root), n)


def dumps(sol: Solution) -> str:
    return json.dumps(sol.to_dict())
