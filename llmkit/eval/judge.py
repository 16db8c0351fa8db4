"""An LLM as a judge: G-Eval scores and a pairwise (A vs B) judge.

G-Eval (Liu et al. 2023, https://arxiv.org/abs/2303.16634): the model first writes evaluation
steps for a criterion by chain of thought (auto-CoT, once per criterion), then reads the task,
criterion, steps, source and summary and is asked for the score; instead of the sampled token
the score is the expectation over the score tokens, score = Σ_s p(s)·s, with p renormalised
over the tokens that spell s ("3" and " 3"). Criteria and scales are the paper's prompts:
coherence, consistency, relevance 1-5, fluency 1-3.

Pairwise: the model is asked which response is better, in both orders (A,B) and (B,A), and the
two probabilities are averaged, which cancels a preference for a position (Zheng et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LLMKitError

GEVAL_TASK = ("You will be given one summary written for a source text (a dialogue or an article). "
              "Your task is to rate the summary on one metric. Please make sure you read and understand "
              "these instructions carefully.")

CRITERIA: dict[str, tuple[str, int, int]] = {  # name -> (definition, lowest, highest)
    "coherence": ("Coherence (1-5) - the collective quality of all sentences. The summary should be "
                  "well-structured and well-organized. The summary should not just be a heap of related "
                  "information, but should build from sentence to sentence to a coherent body of information "
                  "about a topic.", 1, 5),
    "consistency": ("Consistency (1-5) - the factual alignment between the summary and the summarized source. "
                    "A factually consistent summary contains only statements that are entailed by the source "
                    "document. Penalize summaries that contained hallucinated facts.", 1, 5),
    "fluency": ("Fluency (1-3): the quality of the summary in terms of grammar, spelling, punctuation, word "
                "choice, and sentence structure.", 1, 3),
    "relevance": ("Relevance (1-5) - selection of important content from the source. The summary should include "
                  "only important information from the source document. Penalize summaries which contained "
                  "redundancies and excess information.", 1, 5),
}


def score_token_ids(tokenizer, values: list[int]) -> dict[int, list[int]]:
    """For each score value, the single tokens that spell it: "3" and " 3" where each is one token."""
    out = {}
    for v in values:
        ids = set()
        for text in (str(v), f" {v}"):
            enc = tokenizer.encode(text, add_bos=False)
            if len(enc) == 1:
                ids.add(enc[0])
        if not ids:
            raise LLMKitError(f"the tokenizer has no single token for the score {v}")
        out[v] = sorted(ids)
    return out


def weighted_score(logits: torch.Tensor, token_ids: dict[int, list[int]]) -> tuple[float, dict[int, float], float]:
    """G-Eval score from next-token logits (V,): Σ_s p(s)·s with p(s) = Σ_{t spells s} p(t) / Z over
    the score tokens. Returns (score, {s: p(s)}, mass = the probability the model put on any score)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    raw = {s: float(lp[ids].exp().sum()) for s, ids in token_ids.items()}
    mass = sum(raw.values())
    if mass <= 0:
        raise LLMKitError("the model gives zero probability to every score token")
    p = {s: v / mass for s, v in raw.items()}
    return sum(s * q for s, q in p.items()), p, mass


@dataclass
class Judge:
    """Wraps a model and tokenizer; `chat` puts prompts through the chat template."""

    model: object
    tokenizer: object
    chat: bool = False
    max_step_tokens: int = 160

    def _prompt_ids(self, text: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_bos=False)
        C = self.model.cfg.max_seq_len
        if len(ids) > C:
            raise LLMKitError(f"judge prompt of {len(ids)} tokens is longer than the model's context of {C} "
                              "(shorten the source; nothing is cut)")
        return ids

    @torch.inference_mode()
    def next_logits(self, text: str) -> torch.Tensor:
        ids = self._prompt_ids(text)
        dev = next(self.model.parameters()).device
        return self.model(torch.tensor([ids], device=dev), last_only=True)[0, -1].cpu()  # (V,)

    # ------------------------------------------------------------ G-Eval
    def evaluation_steps(self, criterion: str) -> str:
        """Auto-CoT: the model writes the evaluation steps for the criterion (greedy)."""
        from .harness import greedy_generate

        definition = CRITERIA[criterion][0]
        text = f"{GEVAL_TASK}\n\nEvaluation Criteria:\n\n{definition}\n\n"
        if self.chat:  # the steps are the assistant's answer
            text, lead, stops = text + "Write the evaluation steps as a short numbered list.", "", ["Example:"]
        else:  # plain completion: the list starts in the prompt; a blank line ends it
            text, lead, stops = text + "Evaluation Steps:\n\n1.", "1.", ["\n\n", "Example:"]
        out = greedy_generate(self.model, self.tokenizer, [self._prompt_ids(text)], self.max_step_tokens, stops)[0]
        return (lead + out).strip()

    def geval_prompt(self, criterion: str, steps: str, source: str, summary: str) -> str:
        definition, lo, hi = CRITERIA[criterion]
        return (f"{GEVAL_TASK}\n\nEvaluation Criteria:\n\n{definition}\n\nEvaluation Steps:\n\n{steps}\n\n"
                f"Example:\n\nSource Text:\n\n{source.strip()}\n\nSummary:\n\n{summary.strip()}\n\n"
                f"Evaluation Form (scores ONLY, an integer from {lo} to {hi}):\n\n- {criterion.capitalize()}:")

    def geval(self, criterion: str, source: str, summary: str, steps: str) -> dict:
        if criterion not in CRITERIA:
            from ..errors import closest

            raise LLMKitError(f"unknown criterion {criterion!r}{closest(criterion, CRITERIA)}; "
                              f"known: {', '.join(CRITERIA)}")
        _, lo, hi = CRITERIA[criterion]
        ids = score_token_ids(self.tokenizer, list(range(lo, hi + 1)))
        score, p, mass = weighted_score(self.next_logits(self.geval_prompt(criterion, steps, source, summary)), ids)
        return {"score": score, "probs": p, "score_mass": mass}

    # ------------------------------------------------------------ pairwise
    @staticmethod
    def pairwise_prompt(question: str, first: str, second: str) -> str:
        return ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
                "assistants to the user question below. Choose the assistant that follows the user's instructions "
                "and answers the user's question better. Do not let the order of the responses or their length "
                "influence your decision.\n\n"
                f"[User Question]\n{question.strip()}\n\n[The Start of Assistant A's Answer]\n{first.strip()}\n"
                f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{second.strip()}\n"
                "[The End of Assistant B's Answer]\n\nWhich assistant is better, A or B? The better assistant is:")

    def pairwise(self, question: str, a: str, b: str, tie_margin: float = 0.05) -> dict:
        """p(a better) = (p("A" | a shown first) + p("B" | a shown second)) / 2; winner by that."""
        ids = score_token_ids_letters(self.tokenizer)
        _, p1, _ = weighted_score(self.next_logits(self.pairwise_prompt(question, a, b)), ids)
        _, p2, _ = weighted_score(self.next_logits(self.pairwise_prompt(question, b, a)), ids)
        # values: 0 = "A", 1 = "B"; in the swapped order the letter B names response a
        pa = (p1[0] + p2[1]) / 2
        winner = "tie" if abs(pa - 0.5) < tie_margin else ("A" if pa > 0.5 else "B")
        return {"p_a": pa, "p_a_first": p1[0], "p_a_second": p2[1], "winner": winner,
                "consistent": (p1[0] > 0.5) == (p2[1] > 0.5)}


def score_token_ids_letters(tokenizer) -> dict[int, list[int]]:
    """{0: tokens spelling "A", 1: tokens spelling "B"} (with and without a leading space)."""
    out = {}
    for k, letter in enumerate("AB"):
        ids = {enc[0] for t in (letter, f" {letter}") if len(enc := tokenizer.encode(t, add_bos=False)) == 1}
        if not ids:
            raise LLMKitError(f"the tokenizer has no single token for {letter!r}")
        out[k] = sorted(ids)
    return out
