"""LLM judge: the G-Eval probability-weighted score and the two-order pairwise judge."""

import json
import math

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.eval.judge import CRITERIA, Judge, score_token_ids, weighted_score
from test_eval_harness import V, Bigram, CharTok


def test_weighted_score_by_hand():
    logits = torch.full((V,), -1e9)
    ids = {1: [ord("1")], 2: [ord("2"), ord("@")], 3: [ord("3")]}  # "@" stands for " 2"
    logits[ord("1")] = math.log(0.1)
    logits[ord("2")] = math.log(0.2)
    logits[ord("@")] = math.log(0.1)
    logits[ord("3")] = math.log(0.2)
    logits[ord("x")] = math.log(0.4)  # mass off the score tokens is renormalised away
    score, p, mass = weighted_score(logits, ids)
    assert mass == pytest.approx(0.6)
    assert p == pytest.approx({1: 1 / 6, 2: 3 / 6, 3: 2 / 6})
    assert score == pytest.approx(1 / 6 + 2 * 3 / 6 + 3 * 2 / 6)


def test_score_token_ids_uses_single_tokens():
    ids = score_token_ids(CharTok(), [1, 2, 3])
    assert ids == {1: [ord("1")], 2: [ord("2")], 3: [ord("3")]}  # " 1" is two characters here


def _judge_model(next_after_colon: dict[str, float]):
    """A bigram whose next-token distribution after ':' is given (the prompts end with ':')."""
    t = torch.full((V, V), -1e4)
    for ch, p in next_after_colon.items():
        t[ord(":"), ord(ch)] = math.log(p)
    return Bigram(t, max_seq_len=8192)


def test_geval_score_from_prompt():
    j = Judge(_judge_model({"4": 0.5, "5": 0.25, "x": 0.25}), CharTok())
    r = j.geval("coherence", "A: hi. B: hello.", "Two people greet.", steps="1. Read.")
    assert r["score"] == pytest.approx((4 * 0.5 + 5 * 0.25) / 0.75)
    assert r["score_mass"] == pytest.approx(0.75, rel=1e-4)
    assert "Coherence (1-5)" in j.geval_prompt("coherence", "1. Read.", "s", "t")
    with pytest.raises(LLMKitError, match="unknown criterion"):
        j.geval("coherense", "a", "b", "c")
    assert set(CRITERIA) == {"coherence", "consistency", "fluency", "relevance"}


def test_pairwise_cancels_position_bias():
    # always says "A" (first position) with p = 0.8: asking both orders gives p(a better) = 0.5, a tie
    j = Judge(_judge_model({"A": 0.8, "B": 0.2}), CharTok())
    r = j.pairwise("q?", "one", "two")
    assert r["p_a"] == pytest.approx(0.5) and r["winner"] == "tie" and not r["consistent"]


def test_prompt_longer_than_context_is_an_error():
    m = _judge_model({"1": 1.0})
    m.cfg.max_seq_len = 100
    with pytest.raises(LLMKitError, match="longer than the model's context"):
        Judge(m, CharTok()).geval("fluency", "x" * 500, "y", "1.")


def test_cli_judge_bad_input(tmp_path, capsys):
    from llmkit.cli import main

    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"dialogue": "hi", "summary": "greeting"}) + "\n" + json.dumps({"dialogue": "x"}) + "\n")
    assert main(["judge", "--model", "nope-model", "--input", str(f)]) == 2
    assert "line 2 has no text field 'summary'" in capsys.readouterr().err
    assert main(["judge", "--model", "m", "--input", str(f), "--criteria", "fluencyy"]) == 2
    assert "did you mean 'fluency'" in capsys.readouterr().err


def test_evaluation_steps_by_cot(monkeypatch):
    import llmkit.eval.harness as H

    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stop_strings, batch_size=8):
        seen.append("".join(map(chr, prompts[0])))
        return [" Read the dialogue.\n2. Compare the summary."]

    monkeypatch.setattr(H, "greedy_generate", fake_generate)
    j = Judge(_judge_model({"1": 1.0}), CharTok())
    assert j.evaluation_steps("relevance") == "1. Read the dialogue.\n2. Compare the summary."
    assert seen[0].endswith("Evaluation Steps:\n\n1.") and "Relevance (1-5)" in seen[0]
    j.chat = True
    assert j.evaluation_steps("fluency").startswith("Read the dialogue.")
    assert seen[1].startswith("<user>") and seen[1].endswith("<assistant>")
