"""RLAIF / Constitutional AI: constitution loading, the critique -> revision loop, AI feedback's both-orders
judging, and the CLI, on tiny random models with a byte tokenizer."""

import json
import math
import random

import pytest
import torch
import torch.nn as nn
from _shared import byte_chat_tokenizer

from llmkit.align.constitution import DEFAULT, load_constitution
from llmkit.align.rlaif import (Generator, PromptRow, critique_revise, judge_pairs, label_agreement,
                                next_token_logits, preference_record, read_prompt_rows, sft_record)
from llmkit.errors import LLMKitError
from llmkit.inference import SamplingParams
from llmkit.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def tiny(seed=0, ctx=1024):
    torch.manual_seed(seed)  # vocab = the tokenizer's, so every sampled id decodes
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=258, max_seq_len=ctx)).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SHORT = [{"id": "a", "critique": "Bad?", "revision": "Fix.", "preference": "Better?"},
         {"id": "b", "critique": "Wrong?", "revision": "Redo."}]


# ---------------------------------------------------------------- the constitution
def test_default_constitution_loads_and_every_principle_can_judge():
    c = load_constitution()
    assert c.source == str(DEFAULT) and len(c.principles) >= 4
    assert len({p.id for p in c.principles}) == len(c.principles)
    assert all(p.critique and p.revision and p.preference for p in c.principles)
    assert c.sample(random.Random(0)) in c.principles


@pytest.mark.parametrize("text,match", [
    ("", "no principles"),
    ("[]", "no principles"),
    ("- id: a\n  critique: [unclosed\n", "not valid YAML"),
    ("id: a\n", "must be a YAML list"),
    ("- id: a\n  critique: c\n", "principle 1 has no 'revision'"),
    ("- critique: c\n  revision: r\n", "principle 1 has no 'id'"),
    ("- id: a\n  critique: c\n  revision: r\n  preferense: p\n", "unknown key 'preferense'.*did you mean 'preference'"),
    ("- id: a\n  critique: '  '\n  revision: r\n", "'critique' must be a non-empty string"),
    ("- id: a\n  critique: c\n  revision: r\n- id: a\n  critique: c\n  revision: r\n", "id 'a' is used twice"),
    ("- just a string\n", "principle 1 must be a mapping"),
])
def test_constitution_errors_are_one_line(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(LLMKitError, match=match) as e:
        load_constitution(p)
    assert "\n" not in str(e.value)
    with pytest.raises(LLMKitError, match="not found"):
        load_constitution(tmp_path / "missing.yaml")


def test_feedback_needs_a_preference_question(tmp_path):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"principles": SHORT}))  # the {principles: [...]} form is accepted too
    c = load_constitution(p)
    assert [q.id for q in c.for_feedback().principles] == ["a"]
    p.write_text(yaml.safe_dump(SHORT[1:]))
    with pytest.raises(LLMKitError, match="no principle has a 'preference'"):
        load_constitution(p).for_feedback()


# ---------------------------------------------------------------- prompts
def test_prompt_rows_from_every_format(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the SFT answer"}]},
        {"chosen": "\n\nHuman: why?\n\nAssistant: because", "rejected": "\n\nHuman: why?\n\nAssistant: no"},
        {"question": "2+2?"},
    ])
    rows = read_prompt_rows(f)
    assert [r.prompt[-1]["content"] for r in rows] == ["hi", "c", "q", "why?", "2+2?"]
    assert rows[2].prompt == [{"role": "user", "content": "q"}]  # the answer is set aside
    assert rows[3].pair == ("because", "no") and rows[0].pair is None
    assert len(read_prompt_rows(f, limit=2)) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(LLMKitError, match="bad.jsonl:1: no prompt in this row"):
        read_prompt_rows(bad)


# ---------------------------------------------------------------- critique -> revision
class Recorder(Generator):
    """A Generator that records the conversations it is asked to continue."""

    def __call__(self, conversations, n=1):
        self.seen = getattr(self, "seen", []) + [conversations]
        return super().__call__(conversations, n)


def test_critique_loop_rounds_trace_and_a_finetune_readable_sft_file(tmp_path, tok):
    from llmkit.finetune.data import load_sft_data

    c = load_constitution()
    rows = [PromptRow(f"p:{i}", [{"role": "user", "content": f"tell me about {w}"}])
            for i, w in enumerate(["cats", "rain", "tea"])]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, stop_ids=tuple(tok.stop_ids), seed=0)
    gen = Recorder(tiny(), tok, params, batch_size=2)
    traces = critique_revise(gen, rows, c, rounds=2, rng=random.Random(0))
    assert len(gen.seen) == 1 + 2 * 2  # the answers, then a critique and a revision per round
    assert all(len(batch) == 3 for batch in gen.seen)
    ids = {p.id for p in c.principles}
    for row, t in zip(rows, traces):
        assert len(t["rounds"]) == 2 and all(r["principle"] in ids for r in t["rounds"])
        assert t["initial"] is not None and "dropped" not in t
        last = t["rounds"][-1]["revision"]
        assert t["final"] == (last or t["rounds"][0]["revision"] or t["initial"])
    # round 2's critique request holds the prompt, the round-1 revision and the principle's request
    conv = gen.seen[3][0]
    p2 = next(p for p in c.principles if p.id == traces[0]["rounds"][1]["principle"])
    assert conv[0] == rows[0].prompt[0] and conv[-1] == {"role": "user", "content": p2.critique}
    assert conv[1]["content"] == (traces[0]["rounds"][0]["revision"] or traces[0]["initial"])
    revision_ask = gen.seen[4][0]
    assert revision_ask[:3] == conv and revision_ask[-1]["content"] == p2.revision
    sft = [sft_record(r, t) for r, t in zip(rows, traces)]
    sft = [s for s in sft if s]
    assert sft and all(s["messages"][-1]["role"] == "assistant" for s in sft)
    path = write_jsonl(tmp_path / "sft.jsonl", sft)
    data = load_sft_data([str(path)], tok, seq_len=256, val_fraction=0.0)
    assert len(data.train[0]) == len(sft)  # one list of examples per file


def test_rows_too_long_for_the_context_are_dropped_not_cut(tok):
    from llmkit.align.constitution import Constitution, Principle

    c = Constitution((Principle("a", "What is wrong with it? " * 3, "Fix it."),), "test")
    rows = [PromptRow("p:1", [{"role": "user", "content": "x" * 390}]),  # no room for the answer
            PromptRow("p:2", [{"role": "user", "content": "x" * 330}]),  # none for the critique request
            PromptRow("p:3", [{"role": "user", "content": "short"}])]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop_ids=(), seed=0)
    t = critique_revise(Generator(tiny(ctx=400), tok, params), rows, c, rounds=1, rng=random.Random(0))
    assert t[0]["dropped"] == "prompt" and t[0]["initial"] is None and t[0]["rounds"] == []
    assert t[1]["dropped"] == "round 1 critique" and t[1]["initial"] and t[1]["rounds"][0]["critique"] is None
    assert "final" not in t[0] and "final" not in t[1] and t[2]["final"]
    assert [sft_record(r, x) is None for r, x in zip(rows, t)] == [True, True, False]


# ---------------------------------------------------------------- AI feedback
class StubJudge(nn.Module):
    """A judge whose next-token logits are chosen by `pick(text of the row so far)` -> "A" | "B"; it puts
    4 nats more on that letter. Has what next_token_logits uses: forward(idx, return_hidden) and lm_head."""

    def __init__(self, tok, pick):
        super().__init__()
        self.tok, self.pick, self.max_tokens = tok, pick, 4096
        self.lm_head = nn.Linear(2, 258, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[tok.encode("A", add_bos=False)[0], 0] = 4.0
            self.lm_head.weight[tok.encode("B", add_bos=False)[0], 1] = 4.0

    def forward(self, idx, return_hidden=False):
        h = torch.zeros(*idx.shape, 2)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):  # position t sees tokens 0..t only (padding follows a row's end)
                h[b, t, "AB".index(self.pick(self.tok.decode(row[:t + 1])))] = 1.0
        return h if return_hidden else self.lm_head(h)


ITEMS = [([{"role": "user", "content": "how do I stay safe?"}], "wear a helmet", "jump off the roof"),
         ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "a joke?"}], "a pun about cats", "a rude insult")]


def test_a_judge_that_always_says_A_is_undecided(tok):
    judge = StubJudge(tok, lambda text: "A")
    js = judge_pairs(judge, tok, ITEMS, load_constitution(), random.Random(0), batch_size=3)
    p_a = 1 / (1 + math.exp(-4))  # the judge's p("A") over the two letters (fp32 logits: abs 1e-6)
    for j in js:
        assert j.p_as_a == pytest.approx(p_a, abs=1e-6) and j.p_as_b == pytest.approx(1 - p_a, abs=1e-6)
        assert j.p == pytest.approx(0.5)  # the position bias cancels
    rec = preference_record(*ITEMS[0], js[0])
    assert rec["score"] == pytest.approx(0.5) and rec["score_as_a"] != rec["score_as_b"]
    agree = label_agreement(js)
    assert agree["both_orders"] == 0.0 and agree["single_order_label_as_a"] == 1.0
    assert agree["single_order_label_as_b"] == 0.0 and agree["order_consistent"] == 0.0


def test_a_judge_that_prefers_an_answer_picks_it_in_both_orders(tok):
    good = {"wear a helmet", "a pun about cats"}

    def pick(text):  # the letter of the option holding a good answer
        for letter in "AB":
            line = next((ln for ln in text.splitlines() if ln.startswith(f"({letter}) ")), "")
            if line[4:].split("<|")[0] in good:  # the last option ends the user turn
                return letter
        return "A"

    items = ITEMS + [(ITEMS[0][0], ITEMS[0][2], ITEMS[0][1])]  # the good answer second
    js = judge_pairs(StubJudge(tok, pick), tok, items, load_constitution(), random.Random(1), batch_size=2)
    p = 1 / (1 + math.exp(-4))
    for (prompt, a, b), j in zip(items, js):
        rec = preference_record(prompt, a, b, j)
        assert rec["chosen"] in good and rec["rejected"] not in good
        assert rec["score"] == pytest.approx(p, abs=1e-6) and rec["score_as_a"] == pytest.approx(rec["score_as_b"])
        assert rec["principle"] in {q.id for q in load_constitution().principles}
    assert label_agreement(js[:2])["both_orders"] == 1.0


def test_next_token_logits_batched_equal_one_at_a_time(tok):
    model = tiny()
    prompts = [tok.encode(t, add_bos=False) for t in ("a short one", "x", "a rather longer prompt here")]
    batched = next_token_logits(model, prompts, batch_size=3)
    for p, row in zip(prompts, batched):
        with torch.no_grad():
            ref = model(torch.tensor([p]))[0, -1]
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)


def test_feedback_rows_feed_the_preference_loader(tmp_path, tok):
    from llmkit.align.data import load_preference_data

    js = judge_pairs(tiny(), tok, ITEMS, load_constitution(), random.Random(0))
    rows = [preference_record(p, a, b, j) for (p, a, b), j in zip(ITEMS, js)]
    assert all(0.5 <= r["score"] <= 1 for r in rows)
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    data = load_preference_data([str(path)], tok, seq_len=256, val_fraction=0.0)
    assert len(data.train) == 2
    assert isinstance(rows[1]["prompt"], list) and isinstance(rows[0]["prompt"], str)


# ---------------------------------------------------------------- the CLI, end to end into finetune and align
def test_cli_critique_and_feedback_feed_finetune_dpo_and_rm(tmp_path, tok, capsys):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    save_checkpoint(tiny(ctx=512), tmp_path / "m", tokenizer=tok)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in
                                                       ["apple", "river", "stone", "cloud", "green", "house"]])
    common = ["--model", str(tmp_path / "m"), "--device", "cpu", "--max-new-tokens", "5", "--batch-size", "4"]
    sft = tmp_path / "sft.jsonl"
    assert main(["rlaif", "critique", *common, "--prompts", str(prompts), "--rounds", "2", "--limit", "4",
                 "--out", str(sft), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 4 and summary["sft_rows"] <= 4 and summary["rounds"] == 2
    trace = [json.loads(x) for x in (tmp_path / "sft.trace.jsonl").read_text().splitlines()]
    assert len(trace) == 4 and all(len(t["rounds"]) == 2 for t in trace)
    assert main(["rlaif", "critique", *common, "--prompts", str(prompts), "--out", str(sft)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "m"), "--data", str(sft), "--method", "lora",
                 "--out", str(tmp_path / "ft"), "--device", "cpu", "train.steps=1", "train.batch_size=2",
                 "data.seq_len=128", "train.threads=1", "train.progress=false", "data.val_fraction=0"]) == 0
    capsys.readouterr()

    prefs = tmp_path / "prefs.jsonl"
    assert main(["rlaif", "feedback", *common, "--prompts", str(prompts), "--out", str(prefs), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["written"] >= 2 and s["rows"] == 6
    rows = [json.loads(x) for x in prefs.read_text().splitlines()]
    assert all({"prompt", "chosen", "rejected", "score", "principle"} <= set(r) for r in rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"say {w}", "chosen": w.upper(), "rejected": w}
                                                   for w in ["apple", "river", "stone"]])
    labelled = tmp_path / "labelled.jsonl"
    assert main(["rlaif", "feedback", *common, "--pairs", str(pairs), "--judge", str(tmp_path / "m"),
                 "--out", str(labelled), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["agreement_with_labels"]["pairs"] == 3 and s["judged"] == 3
    align = ["align", "--model", str(tmp_path / "m"), "--data", str(prefs), "--device", "cpu", "train.steps=1",
             "train.batch_size=2", "data.seq_len=96", "train.threads=1", "train.progress=false",
             "data.val_fraction=0"]
    assert main(align + ["--method", "dpo", "--out", str(tmp_path / "dpo")]) == 0
    assert main(align + ["--method", "rm", "--out", str(tmp_path / "rm")]) == 0
    capsys.readouterr()

    # bad input: one line, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: a\n")
    for argv, msg in [
        (["critique", *common, "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"), "--constitution",
          str(bad)], "has no 'critique'"),
        (["critique", *common, "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"), "--rounds", "0"],
         "--rounds must be >= 1"),
        (["feedback", *common, "--pairs", str(prompts), "--out", str(tmp_path / "x.jsonl")],
         "--pairs needs preference rows"),
        (["feedback", *common, "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"), "--temperature", "0"],
         "--temperature must be > 0"),
        (["critique", *common, "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.jsonl")],
         "prompt file not found"),
    ]:
        assert main(["rlaif", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.jsonl").exists()
