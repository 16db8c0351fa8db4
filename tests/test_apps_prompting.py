"""Prompt templates, shot selection, answer extraction and self-consistency voting (text only, no model),
plus one end-to-end `solve` on a tiny random model."""

import pytest
import torch

from llmkit.apps.prompting import (METHODS, PromptStyle, Shot, SolveConfig, build_prompt, clean_gsm8k_solution,
                                   extract_answer, get_method, load_math, majority_vote, normalize_number,
                                   same_answer, select_shots, solve)
from llmkit.errors import LLMKitError

POOL = [Shot(f"q{i}", f"because {i}\nThe answer is {i}.", str(i), label="pos" if i % 3 == 0 else "neg")
        for i in range(10)]


def test_gsm8k_solution_is_cleaned():
    sol, final = clean_gsm8k_solution("She sold 48/2 = <<48/2=24>>24 in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72")
    assert final == "72"
    assert sol == "She sold 48/2 = 24 in May.\nIn all 48+24 = 72.\nThe answer is 72."


def test_plain_prompt_zero_one_few_shot():
    style = PromptStyle("Solve it.")
    assert build_prompt(" 2+2? ", [], style) == "Solve it.\n\nQuestion: 2+2?\nAnswer:"
    one = build_prompt("2+2?", POOL[:1], style)
    assert one == "Solve it.\n\nQuestion: q0\nAnswer: because 0\nThe answer is 0.\n\nQuestion: 2+2?\nAnswer:"
    few = build_prompt("2+2?", POOL[:3], PromptStyle(shot_answer="final", answer_start="Let's think step by step."))
    assert few.split("\n\n") == ["Question: q0\nAnswer: The answer is 0.", "Question: q1\nAnswer: The answer is 1.",
                                 "Question: q2\nAnswer: The answer is 2.",
                                 "Question: 2+2?\nAnswer: Let's think step by step."]


def test_chat_prompt_puts_shots_in_turns():
    from _shared import byte_chat_tokenizer

    tok = byte_chat_tokenizer()
    text = build_prompt("2+2?", POOL[:1], PromptStyle("Be brief.", answer_start="Let's"), tok, chat=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq0<|im_end|>\n"
                    "<|im_start|>assistant\nbecause 0\nThe answer is 0.<|im_end|>\n"
                    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\nLet's")
    with pytest.raises(LLMKitError, match="tokenizer"):
        build_prompt("x", [], PromptStyle(), None, chat=True)


def test_shot_selection():
    assert select_shots(POOL, 3, "first") == POOL[:3]
    r = select_shots(POOL, 4, "random", seed=1)
    assert r == select_shots(POOL, 4, "random", seed=1) and len({s.question for s in r}) == 4
    bal = select_shots(POOL, 4, "balanced", seed=0)
    assert [s.label for s in bal] == ["pos", "neg", "pos", "neg"]  # round-robin in order of first appearance
    assert select_shots(POOL, 0) == []
    with pytest.raises(LLMKitError, match="only 10"):
        select_shots(POOL, 11)
    with pytest.raises(LLMKitError, match="unknown shot selection 'similr'.*similar"):
        select_shots(POOL, 1, "similr")


def test_similar_selection_puts_the_nearest_last():
    # embedding = one-hot of the digit in the text: the query "q7 q3" is nearest to q7 and q3
    def embed(texts):
        e = torch.zeros(len(texts), 10)
        for i, t in enumerate(texts):
            for d in range(10):
                if f"q{d}" in t:
                    e[i, d] = 2.0 if t.startswith(f"q{d}") else 1.0
        return e

    got = select_shots(POOL, 2, "similar", query="q7 q3", embed=embed)
    assert [s.question for s in got] == ["q3", "q7"]  # q7 (weight 2) is nearest, so last


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,250.00", "1250"),
    ("the final answer is: -3", "-3"),
    ("blah #### 42", "42"),
    ("\\boxed{18}", "18"),
    ("She has 5 apples and eats 2, so 3 remain", "3"),
    ("The answer is 12. Then 99 more words 100", "12"),
    ("no numbers here", None),
    ("", None),
    ("0.50 dollars", "0.5"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_and_compare():
    assert normalize_number("18.0") == "18" and normalize_number("$3,000") == "3000" and normalize_number("-0.0") == "0"
    assert same_answer("18", "18.0") and not same_answer(None, "1") and not same_answer("17", "18")


def test_majority_vote_and_ties():
    assert majority_vote(["3", "5", "3", None, "5", "3"]) == ("3", {"3": 3, "5": 2})
    # tie 2-2: "5" reached two votes first
    assert majority_vote(["5", "3", "5", "3"])[0] == "5"
    assert majority_vote(["3", "5", "5", "3"])[0] == "5"
    assert majority_vote([None, None]) == (None, {})
    assert majority_vote(["7"])[0] == "7"


def test_methods_registry():
    assert {"direct", "cot", "cot-fewshot", "sc"} <= set(METHODS)
    assert get_method("pal").name == "pal"
    with pytest.raises(LLMKitError, match="unknown method 'cott'"):
        get_method("cott")


def test_load_math_reads_gsm8k_and_svamp(shared_data):
    g = load_math("gsm8k", 2, shared_data)
    assert g[0]["answer"] == "18" and g[0]["question"].startswith("Janet")
    s = load_math("svamp", 1, shared_data)
    assert s[0]["answer"] == "51" and "dvds" in s[0]["question"]


def test_solve_end_to_end_on_a_tiny_model():
    from _shared import byte_chat_tokenizer
    from llmkit.models import ModelConfig, Transformer

    torch.manual_seed(0)
    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig(vocab_size=260, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=1024)).eval()
    sols = solve(model, tok, ["What is 2+2?"], POOL, SolveConfig(method="sc", shots=1, max_new_tokens=8, samples=3))
    assert len(sols) == 1 and len(sols[0].outputs) == 3 and len(sols[0].answers) == 3
    assert sols[0].prediction == majority_vote(sols[0].answers)[0]
    with pytest.raises(LLMKitError, match="temperature"):
        solve(model, tok, ["x"], POOL, SolveConfig(method="sc", samples=3, temperature=0.0, shots=0))
