"""RLAIF / Constitutional AI: a model improves its own answers under written principles (llmkit/align/constitution.py).

Critique -> revision (SL-CAI, Bai et al. 2022, section 3): the model answers each prompt; then, for R rounds,
a principle sampled from the constitution asks it to criticise its last answer, and then to rewrite the
answer according to the critique. The final revisions are an SFT set (`critique_revise`, rows for
`llmkit finetune`). Each round sees the prompt, the current answer and that round's requests only (not the
earlier rounds), so the context stays bounded however many rounds run.

    user: PROMPT                          -> assistant: answer_0
    user: PROMPT, assistant: answer_r, user: CRITIQUE REQUEST          -> critique_r
    ... + assistant: critique_r, user: REVISION REQUEST                -> answer_{r+1}

AI feedback (RL-CAI, Bai et al. 2022, section 4.1; RLAIF, Lee et al. 2023, https://arxiv.org/abs/2309.00267):
for a prompt and two answers, a sampled principle frames a multiple-choice question, and the judge's
preference is read from its next-token distribution after "The answer is: (" (no sampling):

    p(a better | a shown as A) = p(A) / (p(A) + p(B))          one forward, (B, V) logits at the last token

Judges prefer a position (Zheng et al. 2023; Lee et al. 2023, section 3.1), so the question is asked in both
orders and the two are averaged, p(a) = (p(a | a is A) + p(a | a is B)) / 2: a judge that always says "A"
gives exactly 0.5. The better answer becomes "chosen" of a preference row that `llmkit align --method
dpo|rm` reads (llmkit.align.data), with the preference strength as "score".

Generation goes through the inference engine (`generate_batch`: right-padded batched prefill + KV-cache
decode) with the model's chat template; the judge's forwards are batched over rows too.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field

import torch

from ..errors import LLMKitError
from ..inference import SamplingParams, generate_batch
from .constitution import Constitution, Principle

log = logging.getLogger(__name__)

FEEDBACK_ASK = "Consider the following conversation between a human and an assistant:"  # Bai et al. 2022, 4.1
FEEDBACK_PREFILL = "The answer is: ("  # the judge's reply starts here; its next token is the letter
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ------------------------------------------------------------------ prompt files
@dataclass
class PromptRow:
    where: str  # file:line, for messages
    prompt: list[dict]  # chat messages, the last one the user's
    pair: tuple[str, str] | None = None  # (chosen, rejected) when the row is a preference pair


def read_prompt_rows(path, limit: int | None = None) -> list[PromptRow]:
    """Prompts from a JSONL/JSON file (.gz too), per row: a preference pair in any format llmkit.align.data
    reads (its prompt, and its pair kept for `--pairs`); {"prompt": str | messages}; {"question"} or
    {"instruction", "input"}; or a chat/ShareGPT conversation, whose final assistant reply (an SFT row's
    answer) is set aside."""
    from pathlib import Path

    from ..finetune.data import read_records
    from .data import _prompt_messages, to_pair

    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"prompt file not found: {p}")
    rows = []
    for i, rec in read_records(p)[: limit or None]:
        where = f"{p}:{i}"
        if "chosen" in rec or "rejected" in rec:
            prompt, chosen, rejected = to_pair(rec, where)
            rows.append(PromptRow(where, prompt, (chosen, rejected)))
            continue
        if isinstance(rec.get("prompt"), str):
            prompt = [{"role": "user", "content": rec["prompt"]}]
        elif isinstance(rec.get("prompt"), list):
            prompt = _prompt_messages({"messages": rec["prompt"]}, where)
        elif "messages" in rec or "conversations" in rec:
            prompt = _prompt_messages(rec, where)
            if prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
        elif isinstance(rec.get("question"), str):
            prompt = [{"role": "user", "content": rec["question"]}]
        elif isinstance(rec.get("instruction"), str):
            extra = rec.get("input") or ""
            prompt = [{"role": "user", "content": f"{rec['instruction']}\n\n{extra}" if extra else rec["instruction"]}]
        else:
            raise LLMKitError(f"{where}: no prompt in this row (fields {', '.join(sorted(rec)) or 'none'}); expected "
                              "prompt, question, instruction, messages/conversations or a preference pair")
        if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
            raise LLMKitError(f"{where}: the prompt must end with a non-empty user turn")
        rows.append(PromptRow(where, prompt))
    return rows


def prompt_field(messages: list[dict]):
    """A prompt as written to an output row: the plain string for a single user turn, else the messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


# ------------------------------------------------------------------ generation
def chat_ids(tok, messages: list[dict], prefill: str = "") -> list[int]:
    """The chat-templated conversation with the assistant turn opened (and `prefill` written into it)."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True) + prefill, add_bos=False)


@dataclass
class Generator:
    """Batched chat generation with the inference engine: conversations in, reply texts out. A conversation
    that leaves no room for max_new_tokens in the context gives None (its row is dropped, not cut)."""

    model: object
    tok: object
    params: SamplingParams
    batch_size: int = 8
    bar: object = None  # a progress bar, advanced by one per conversation
    calls: int = field(default=0, init=False)  # varies the seed per call: chunks do not share samples

    def __call__(self, conversations: list[list[dict]], n: int = 1) -> list[list[str] | None]:
        ids = [chat_ids(self.tok, c) for c in conversations]
        room = self.model.max_tokens
        fits = [i for i, x in enumerate(ids) if len(x) + max(self.params.max_new_tokens, 1) <= room]
        out: list[list[str] | None] = [None] * len(ids)
        for s in range(0, len(fits), self.batch_size):
            chunk = fits[s:s + self.batch_size]
            seed = None if self.params.seed is None else self.params.seed + 7919 * self.calls
            self.calls += 1
            params = dataclasses.replace(self.params, n=n, seed=seed)
            gens = generate_batch(self.model, [ids[i] for i in chunk], params, tokenizer=self.tok)
            for i, g in zip(chunk, gens):
                out[i] = [c.text.strip() for c in g.completions]
            if self.bar is not None:
                self.bar.update(len(chunk))
        if self.bar is not None:
            self.bar.update(len(ids) - len(fits))
        return out


def critique_revise(gen: Generator, rows: list[PromptRow], constitution: Constitution, rounds: int,
                    rng: random.Random) -> list[dict]:
    """SL-CAI over all rows, stage by stage (each stage one batched pass over the live rows). -> one trace per
    row: {"prompt", "initial", "rounds": [{"principle", "critique", "revision"}], "final"}; a row whose
    conversation outgrew the context has "dropped" (the stage) instead of "final"."""
    if rounds < 1:
        raise LLMKitError(f"rounds must be >= 1, got {rounds}")
    traces = [{"source": r.where, "prompt": prompt_field(r.prompt), "initial": None, "rounds": []} for r in rows]
    answers = [a[0] if a else None for a in gen([r.prompt for r in rows])]
    live = []
    for k, a in enumerate(answers):
        traces[k]["initial"] = a
        if a is None:
            traces[k]["dropped"] = "prompt"
        else:
            live.append(k)
    for r in range(rounds):
        principles: dict[int, Principle] = {k: constitution.sample(rng) for k in live}

        def ask(k: int) -> list[dict]:
            return rows[k].prompt + [{"role": "assistant", "content": answers[k]},
                                     {"role": "user", "content": principles[k].critique}]

        critiques = gen([ask(k) for k in live])
        keep = [(k, c[0]) for k, c in zip(live, critiques) if c is not None]
        revisions = gen([ask(k) + [{"role": "assistant", "content": c},
                                   {"role": "user", "content": principles[k].revision}] for k, c in keep])
        done = {k: (c, v[0] if v else None) for (k, c), v in zip(keep, revisions)}
        for k in live:
            c, v = done.get(k, (None, None))
            step = {"principle": principles[k].id, "critique": c, "revision": v}
            traces[k]["rounds"].append(step)
            if v is None:
                traces[k]["dropped"] = f"round {r + 1} {'revision' if c is not None else 'critique'}"
            elif v:  # an empty revision keeps the answer it failed to rewrite
                answers[k] = v
        live = [k for k in live if "dropped" not in traces[k]]
    for k in live:
        traces[k]["final"] = answers[k]
    return traces


def sft_record(row: PromptRow, trace: dict) -> dict | None:
    """The SFT row `llmkit finetune` reads (chat messages ending with the final revision), or None."""
    if trace.get("final") is None or not trace["final"].strip():
        return None
    return {"messages": row.prompt + [{"role": "assistant", "content": trace["final"]}]}


# ------------------------------------------------------------------ AI feedback
def render_conversation(messages: list[dict]) -> str:
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content'].strip()}"
                       for m in messages)


def feedback_messages(prompt: list[dict], first: str, second: str, principle: Principle) -> list[dict]:
    """The multiple-choice question of Bai et al. 2022 (section 4.1) as one user turn."""
    text = (f"{FEEDBACK_ASK}\n\n{render_conversation(prompt)}\n\n{principle.preference}\n"
            f"Options:\n(A) {first.strip()}\n(B) {second.strip()}")
    return [{"role": "user", "content": text}]


@torch.inference_mode()
def next_token_logits(model, prompts: list[list[int]], batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """The logits (N, V) of the token after each prompt (token ids), right-padded batches of one forward
    each. Causal attention makes the padding after a row's last token invisible to it; only the last
    position of each row goes through the output head (hidden (B, T, C) -> (B, C) -> (B, V))."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        lengths = torch.tensor([len(p) for p in chunk])
        idx = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        for b, p in enumerate(chunk):
            idx[b, :len(p)] = torch.tensor(p)
        h = model(idx.to(dev), return_hidden=True)  # (B, T, C)
        last = h[torch.arange(len(chunk), device=dev), (lengths - 1).to(dev)]  # (B, C)
        out.append(model.lm_head(last).float().cpu())  # (B, V)
    return torch.cat(out)


@dataclass
class Judgement:
    p_as_a: float  # p(response a better) when a is shown as option (A)
    p_as_b: float  # ... when a is shown as (B)
    principle: str
    mass: float  # the judge's probability on the letters at all (mean of the two orders)

    @property
    def p(self) -> float:
        """Both orders averaged: a position preference cancels."""
        return (self.p_as_a + self.p_as_b) / 2


def judge_pairs(model, tok, items: list[tuple[list[dict], str, str]], constitution: Constitution,
                rng: random.Random, batch_size: int = 8, bar=None) -> list[Judgement | None]:
    """For each (prompt messages, a, b): ask the judge under a sampled principle, in both orders.
    None for an item whose question does not fit the judge's context."""
    from ..eval.judge import score_token_ids_letters, weighted_score

    letters = score_token_ids_letters(tok)  # {0: ids spelling "A" (" A"), 1: "B"}
    constitution = constitution.for_feedback()
    principles = [constitution.sample(rng) for _ in items]
    queries, index = [], []  # 2 per item: (a, b) then (b, a)
    for k, ((prompt, a, b), pr) in enumerate(zip(items, principles)):
        ids = [chat_ids(tok, feedback_messages(prompt, x, y, pr), FEEDBACK_PREFILL) for x, y in ((a, b), (b, a))]
        if max(len(x) for x in ids) >= model.max_tokens:
            log.warning("feedback question of %d tokens does not fit the judge's context of %d: row %d skipped",
                        max(len(x) for x in ids), model.max_tokens, k)
            continue
        queries += ids
        index.append(k)
    out: list[Judgement | None] = [None] * len(items)
    pad = tok.pad_id if tok.pad_id is not None else 0
    step = max(2, batch_size - batch_size % 2)  # both orders of an item in the same batch
    for s in range(0, len(queries), step):
        logits = next_token_logits(model, queries[s:s + step], step, pad)
        for j in range(0, logits.size(0), 2):
            _, p1, m1 = weighted_score(logits[j], letters)  # a shown as (A): p1[0] = p("A")
            _, p2, m2 = weighted_score(logits[j + 1], letters)  # a shown as (B): p2[1] = p("B")
            k = index[(s + j) // 2]
            out[k] = Judgement(p1[0], p2[1], principles[k].id, (m1 + m2) / 2)
        if bar is not None:
            bar.update(logits.size(0) // 2)
    if bar is not None:
        bar.update(len(items) - len(index))
    return out


def preference_record(prompt: list[dict], a: str, b: str, j: Judgement) -> dict:
    """A preference row for llmkit.align.data: the judged-better answer is "chosen"; "score" is the judge's
    p(chosen better) (both orders; 0.5 = undecided), "score_as_a"/"score_as_b" that p with the chosen answer
    shown as option (A) / (B): their gap is the judge's position bias."""
    if j.p >= 0.5:
        chosen, rejected, s_a, s_b = a, b, j.p_as_a, j.p_as_b
    else:
        chosen, rejected, s_a, s_b = b, a, 1 - j.p_as_b, 1 - j.p_as_a
    return {"prompt": prompt_field(prompt), "chosen": chosen, "rejected": rejected, "score": round((s_a + s_b) / 2, 6),
            "score_as_a": round(s_a, 6), "score_as_b": round(s_b, 6), "principle": j.principle,
            "letter_mass": round(j.mass, 6)}


def label_agreement(judgements: list[Judgement], seed: int = 0) -> dict:
    """How often the judge agrees with labels, where each judgement's response a is the labelled-better
    one: both orders averaged, and one order only (the order drawn at random per pair; the labelled answer
    always first; always second). Ties (p = 0.5) count as disagreement."""
    js = [j for j in judgements if j is not None]
    if not js:
        return {"pairs": 0}
    rng = random.Random(seed)
    n = len(js)
    return {"pairs": n,
            "both_orders": sum(j.p > 0.5 for j in js) / n,
            "single_order": sum((j.p_as_a if rng.random() < 0.5 else j.p_as_b) > 0.5 for j in js) / n,
            "single_order_label_as_a": sum(j.p_as_a > 0.5 for j in js) / n,
            "single_order_label_as_b": sum(j.p_as_b > 0.5 for j in js) / n,
            "order_consistent": sum((j.p_as_a > 0.5) == (j.p_as_b > 0.5) for j in js) / n,
            "mean_letter_mass": sum(j.mass for j in js) / n}
