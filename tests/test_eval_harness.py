"""Benchmark harness: known log-likelihoods, packed scoring = plain scoring, cache, bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LLMKitError
from llmkit.eval.harness import (EvalConfig, continuation_logprobs, encode_pair, evaluate, mean_stderr,
                                 pack_trees, to_markdown)
from llmkit.eval.perplexity import perplexity
from llmkit.eval.tasks import BUILTIN, extract_number, get_task, task_from_file
from llmkit.models import ModelConfig, Transformer
from llmkit.scoring import token_logprobs

V = 128


class CharTok:
    """One token per ASCII character; enough of the Tokenizer API for the harness and the judge."""

    bos_id, eos_id = None, 0
    stop_ids = frozenset({0})

    def encode(self, text, add_bos=None):
        return [ord(c) % V for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


class Bigram(nn.Module):
    """logits(t) = table[token t]: log p(next | prev) = log_softmax(table[prev])[next], known by hand."""

    def __init__(self, table, max_seq_len=64):
        super().__init__()
        self.table = nn.Parameter(table)
        self.lm_head = nn.Identity()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len, sliding_window=None)
        self.calls = 0

    @property
    def max_tokens(self):
        return self.cfg.max_seq_len

    def forward(self, idx, input_pos=None, cache=None, return_hidden=False, last_only=False, embeds=None, attn_mask=None):
        self.calls += 1
        h = self.table[idx]
        return h[:, -1:] if last_only else h


def _bigram():
    t = torch.zeros(V, V)
    t[ord(" "), ord("c")] = 3.0
    t[ord(" "), ord("d")] = 3.3
    t[ord("d"), ord("d")] = 4.0
    return Bigram(t)


def test_hand_built_example_acc_and_acc_norm(tmp_path):
    f = tmp_path / "toy.jsonl"
    f.write_text(json.dumps({"query": "ab", "choices": ["c", "dd"], "gold": 1}) + "\n")
    model = _bigram()
    lp = F.log_softmax(model.table.detach(), -1)
    o = ord
    ll_c = lp[o("b"), o(" ")] + lp[o(" "), o("c")]  # "ab" -> " c"
    ll_dd = lp[o("b"), o(" ")] + lp[o(" "), o("d")] + lp[o("d"), o("d")]  # "ab" -> " dd"
    assert ll_c > ll_dd and ll_c / 1 < ll_dd / 2  # acc picks "c", acc_norm (per character) picks "dd"
    rep = evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=None, progress=False)
    rec = rep["samples"]["toy"][0]
    assert rec["ll"] == pytest.approx([float(ll_c), float(ll_dd)], abs=1e-5)
    r = rep["results"]["toy"]
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["n"] == 1
    assert "| toy | 1 | 0 | acc_norm | 100.00 |" in to_markdown(rep)


def test_encode_pair_moves_trailing_space():
    ctx, cont = encode_pair(CharTok(), "Q: x\nAnswer: ", "yes")
    assert "".join(map(chr, ctx)) == "Q: x\nAnswer:" and "".join(map(chr, cont)) == " yes"


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-mistral"])
def test_packed_tree_scoring_equals_plain_scoring(preset):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(5):
        ctx = torch.randint(0, cfg.vocab_size, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(3):
            n = int(torch.randint(1, 6, (1,), generator=g))
            pairs.append((ctx, torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()))
    got = continuation_logprobs(model, pairs, batch_size=7)
    want = [float(token_logprobs(model, c + d)[len(c) - 1:].double().sum()) for c, d in pairs]
    assert got == pytest.approx(want, abs=2e-5)


def test_pack_trees_mask_and_positions():
    tokens, pos, mask, preds = pack_trees([([1, 2], [[3, 4], [5]]), ([6], [[7]])])
    assert tokens.tolist() == [1, 2, 3, 6] and pos.tolist() == [0, 1, 2, 0]
    assert preds == [[1, 2], [1], [3]]
    m = mask[0, 0]
    assert m[2].tolist() == [True, True, True, False]  # continuation sees its context and itself
    assert m[3].tolist() == [False, False, False, True]  # the next group sees nothing before it


def test_cache_makes_rerun_free(tmp_path):
    f = tmp_path / "toy.jsonl"
    f.write_text("".join(json.dumps({"query": q, "choices": ["c", "dd"], "gold": 0}) + "\n" for q in ("ab", "ba")))
    model, cache = _bigram(), tmp_path / "cache.sqlite"
    r1 = evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=cache, progress=False)
    calls = model.calls
    r2 = evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=cache, progress=False)
    assert model.calls == calls and r1["results"] == r2["results"]
    with torch.no_grad():  # new weights -> new fingerprint -> scored again
        model.table[0, 0] += 1
    evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=cache, progress=False)
    assert model.calls > calls


def test_cache_keys_on_every_weight(tmp_path):
    """Issue 21: the fingerprint once hashed a strided sample (every 4th value of this 128x128 table),
    so changing a skipped weight returned the old model's cached score. Every byte is hashed now."""
    import hashlib

    from llmkit.eval.harness import model_fingerprint

    def sampled(model):  # the old fingerprint, to show the changed weight is one it skipped
        h = hashlib.sha256()
        for t in model.state_dict().values():
            flat = t.flatten()
            h.update(flat[::max(1, flat.numel() // 4096)].numpy().tobytes())
        return h.hexdigest()

    f = tmp_path / "toy.jsonl"
    f.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 1}) + "\n")
    model, cache = Bigram(torch.zeros(V, V)), tmp_path / "cache.sqlite"
    r1 = evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=cache, progress=False)
    assert r1["results"]["toy"]["acc"] == 0.0  # a tie: the first choice wins
    old_sample, old_fp = sampled(model), r1["fingerprint"]
    with torch.no_grad():
        model.table[ord(" "), ord("c")] = 5.0  # " c" after "a": flat index 4195, not a multiple of the old stride 4
    assert sampled(model) == old_sample and model_fingerprint(model) != old_fp
    r2 = evaluate(model, CharTok(), [task_from_file(f)], EvalConfig(), cache_path=cache, progress=False)
    assert r2["results"]["toy"]["acc"] == 1.0
    # any dtype, a tensor shared under two names, a non-tensor entry: all hashed, stable across calls
    m = nn.Module()
    m.a = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    m.register_buffer("mask", torch.tensor([True, False]))
    m.b = m.a
    assert model_fingerprint(m) == model_fingerprint(m)
    before = model_fingerprint(m)
    with torch.no_grad():
        m.mask[1] = True
    assert model_fingerprint(m) != before


def test_context_too_short_is_an_error(tmp_path):
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"query": "x" * 100, "choices": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(LLMKitError, match="context of 64 tokens"):
        evaluate(_bigram(), CharTok(), [task_from_file(f)], EvalConfig(), cache_path=None, progress=False)


def test_bad_task_inputs(tmp_path):
    with pytest.raises(LLMKitError, match="known tasks: .*arc_easy"):
        get_task("arc_esay")
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 0}) + "\n{not json\n")
    with pytest.raises(LLMKitError, match="line 2"):
        task_from_file(f)
    f.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 0}) + "\n"
                 + json.dumps({"query": "a", "choices": ["b", "c"], "gold": 5}) + "\n")
    with pytest.raises(LLMKitError, match="line 2: gold"):
        task_from_file(f)


def test_builtin_tasks_and_prompts(shared_data):
    for name in BUILTIN:
        assert get_task(name, shared_data).docs
    arc = get_task("arc_easy", shared_data)
    ex = arc.to_example(arc.docs[0], arc.fewshot_prefix(0, 0))
    assert ex.contexts[0].startswith("Question: ") and ex.contexts[0].endswith("\nAnswer: ")
    full = get_task("mmlu", shared_data)
    assert len(full.subjects) == 57 and len(full.select(2)) == 114  # --limit is per subject
    mmlu = get_task("mmlu:anatomy", shared_data)
    pre = mmlu.fewshot_prefix(0, 2)
    ex = mmlu.to_example(mmlu.docs[0], pre)
    assert pre.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert pre.count("\nAnswer: ") == 2 and ex.continuations == ["A", "B", "C", "D"]
    assert ex.contexts[0].endswith("\nD. " + mmlu.docs[0]["choices"][3].strip() + "\nAnswer: ")
    cloze = get_task("mmlu_cloze:anatomy", shared_data)
    ex = cloze.to_example(cloze.docs[0], cloze.fewshot_prefix(0, 0))
    assert ex.continuations == [c.strip() for c in cloze.docs[0]["choices"]]
    # k-shot examples never include the example itself
    arc_shots = arc.fewshot_prefix(3, 5)
    assert arc.docs[3]["query"] not in arc_shots and arc_shots.count("\nAnswer: ") == 5
    gsm = get_task("gsm8k", shared_data)
    ex = gsm.to_example(gsm.docs[0], gsm.fewshot_prefix(0, 2))
    assert ex.prompt.count("####") == 2 and ex.prompt.endswith("\nAnswer:") and ex.target.isdigit()


def test_extract_number():
    assert extract_number("so 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert extract_number("she pays $18.00 in total.") == "18"
    assert extract_number("-5 degrees then 2.50") == "2.5"
    assert extract_number("no number") is None


def test_gsm8k_generation_is_exact_match(shared_data, monkeypatch):
    """Generation is the inference engine's; here it answers a fixed text: gsm8k's first answer is 18."""
    import llmkit.eval.harness as H

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stop_strings, batch_size=8):
        seen["prompts"] = prompts
        return [" She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars."] * len(prompts)

    monkeypatch.setattr(H, "greedy_generate", fake_generate)
    model = _bigram()
    model.cfg.max_seq_len = 4096
    rep = evaluate(model, CharTok(), [get_task("gsm8k", shared_data)], EvalConfig(limit=2, shots=1),
                   cache_path=None, progress=False)
    recs = rep["samples"]["gsm8k"]
    assert [r["pred"] for r in recs] == ["18", "18"] and recs[0]["gold"] == "18" and recs[1]["gold"] != "18"
    assert rep["results"]["gsm8k"]["exact_match"] == 0.5
    assert "".join(map(chr, seen["prompts"][0])).count("####") == 1  # one CoT shot


def test_greedy_generate_runs_the_engine():
    from llmkit.eval.harness import greedy_generate

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama")).eval()
    out = greedy_generate(model, CharTok(), [[1, 2, 3], [4, 5]], 5, [])
    assert len(out) == 2 and all(isinstance(o, str) and len(o) <= 5 for o in out)


def test_mean_stderr_matches_lm_eval():
    m, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))


def test_sliding_window_perplexity():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama")).eval()
    tok = CharTok()
    text = "the quick brown fox jumps over the lazy dog " * 3  # 135 tokens
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():
        full = F.log_softmax(model(ids[None])[0, :-1], -1).gather(-1, ids[1:, None]).sum()
    fits = perplexity(model, tok, [text], context=len(ids))
    assert fits["nll"] == pytest.approx(-float(full), rel=1e-6)
    assert fits["bits_per_byte"] == pytest.approx(-float(full) / math.log(2) / (len(text) - 1), rel=1e-6)
    # windows of 32 every 8 tokens: each token scored once with its window's left context
    C, S = 32, 8
    want, scored = 0.0, 1
    with torch.no_grad():
        for start in range(0, len(ids) - 1, S):
            end = min(start + C, len(ids))
            lp = F.log_softmax(model(ids[None, start:end])[0, :-1], -1).gather(-1, ids[start + 1:end, None])[:, 0]
            first = max(scored, start + 1)
            want += float(lp[first - start - 1:].sum())
            scored = end
            if end == len(ids):
                break
    slid = perplexity(model, tok, [text], context=C, stride=S)
    assert slid["nll"] == pytest.approx(-want, rel=1e-6) and slid["tokens"] == len(ids) - 1
    assert slid["nll"] != pytest.approx(fits["nll"], rel=1e-6)  # less context -> a different value
    with pytest.raises(LLMKitError, match="stride"):
        perplexity(model, tok, [text], context=C, stride=C + 1)


def test_cli_eval_errors(tmp_path, capsys):
    from llmkit.cli import main

    assert main(["eval", "--model", "smollm2-135m-instruct", "--tasks", "arc_easy,hellaswag"]) == 2
    assert "unknown task 'hellaswag'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": "ab", "gold": 0}\n')
    assert main(["eval", "--model", "smollm2-135m-instruct", "--task-file", str(bad)]) == 2
    assert "line 2 is not a task example" in capsys.readouterr().err
    assert main(["eval", "--model", "smollm2-135m-instruct", "--tasks", "piqa", "--limit", "0"]) == 2


def test_smollm2_cli_eval_matches_plain_scoring(smollm2_gguf, shared_data, tmp_path, monkeypatch, capsys):
    """`llmkit eval` on SmolLM2: packed, cached scores equal scoring each choice alone."""
    import llmkit.loading
    from llmkit.cli import main

    # fp32: this checks the packing; the quantized default's bf16-activation kernels round differently
    # for different row counts (about 0.1 nats on a 10-token continuation), packed or not
    model, tok = llmkit.loading.load_model(str(smollm2_gguf), dtype=torch.float32)
    monkeypatch.setattr(llmkit.loading, "load_model", lambda spec, **kw: (model, tok))  # load once
    args = ["eval", "--model", str(smollm2_gguf), "--tasks", "arc_easy", "--limit", "2",
            "--cache", str(tmp_path / "c.sqlite"), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "| arc_easy | 2 | 0 | acc |" in capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["results"]["arc_easy"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert main(args) == 2  # --out exists: refuses without --force
    task = get_task("arc_easy", shared_data)
    recs = [json.loads(x) for x in (tmp_path / "run" / "samples" / "arc_easy.jsonl").open()]
    for rec, doc in zip(recs, task.docs):
        ex = task.to_example(doc, "")
        for ll, ctx, cont in zip(rec["ll"], ex.contexts, ex.continuations):
            c, d = encode_pair(tok, ctx, cont)
            assert ll == pytest.approx(float(token_logprobs(model, c + d)[len(c) - 1:].double().sum()), abs=1e-3)


def test_token_logprobs_with_stride_equal_to_context_scores_every_token():
    """With stride = C the next window must start one token early: a window starting at the first unscored
    token cannot predict it (it was once left as uninitialised memory: -2e30 bits per byte on a long text)."""
    from llmkit.scoring import token_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama")).eval()
    ids = torch.randint(0, 256, (100,))
    C = 16
    lp = token_logprobs(model, ids, context=C, stride=C)
    assert torch.equal(lp, token_logprobs(model, ids, context=C, stride=C - 1))
    with torch.no_grad():  # token 16, the first past the first window, from the window ids[15:31]
        want = torch.log_softmax(model(ids[None, 15:31])[0, 0], -1)[ids[16]]
    assert lp[15] == pytest.approx(float(want), abs=1e-5)


def test_eval_prompting_goes_through_the_prompting_methods(shared_data, monkeypatch):
    """`--prompting sc`: the model sees prompting's CoT template (instruction, worked shots from the task's
    train split, the bare question), k paths are sampled and the vote decides; zero-shot shows no shots."""
    import llmkit.inference as inf
    from llmkit.apps.prompting import COT_INSTRUCTION, DIRECT_INSTRUCTION

    seen = []

    def fake_generate_batch(model, prompts, params, tokenizer=None):
        seen.append(([tokenizer.decode(p) for p in prompts], params))
        # per prompt: 2 paths say 7, 3 say 18 (gsm8k's first gold), in an order where 7 comes first
        texts = [" so 7. The answer is 7.", " The answer is 18.", "The answer is 7.", " 18", "The answer is 18."]
        return [SimpleNamespace(completions=[SimpleNamespace(text=t) for t in texts[:params.n]]) for _ in prompts]

    monkeypatch.setattr(inf, "generate_batch", fake_generate_batch)
    model = _bigram()
    model.cfg.max_seq_len = 4096
    task = get_task("gsm8k", shared_data)
    rep = evaluate(model, CharTok(), [task], EvalConfig(limit=2, shots=2, chat=True, prompting="sc", samples=5),
                   cache_path=None, progress=False)
    (prompts, params), = seen
    assert params.n == 5 and params.temperature == 0.7
    p0 = prompts[0]
    assert p0.startswith("<system>" + COT_INSTRUCTION) and p0.endswith("at the farmers' market?<assistant>")
    assert p0.count("<user>") == 3 and p0.count("The answer is") == 3 and "<<" not in p0  # instruction + 2 cleaned shots
    assert task.fewshot_pool[0]["question"].strip() in p0 and "Answer:" not in p0  # not the harness's template
    recs = rep["samples"]["gsm8k"]
    assert recs[0]["votes"] == {"7": 2, "18": 3} and recs[0]["pred"] == "18" and recs[0]["exact_match"] == 1.0
    assert recs[1]["pred"] == "18" and recs[1]["exact_match"] == 0.0  # the second problem's gold is not 18
    r = rep["results"]["gsm8k"]
    assert (r["prompting"], r["samples"], r["shots"], r["exact_match"]) == ("sc", 5, 2, 0.5)
    assert "gsm8k (sc, 5 samples)" in to_markdown(rep)

    seen.clear()
    rep = evaluate(model, CharTok(), [get_task("svamp", shared_data)], EvalConfig(limit=1, prompting="zero-shot"),
                   cache_path=None, progress=False)
    (prompts, params), = seen
    assert params.n == 1 and params.temperature == 0.0 and rep["results"]["svamp"]["shots"] == 0
    assert prompts[0].startswith(DIRECT_INSTRUCTION + "\n\nQuestion: ") and prompts[0].endswith("\nAnswer:")
    assert rep["samples"]["svamp"][0]["pred"] == "7"  # greedy: the first (only) path
    with pytest.raises(LLMKitError, match="temperature 0"):
        evaluate(model, CharTok(), [task], EvalConfig(limit=1, prompting="cot", samples=3), cache_path=None,
                 progress=False)
    with pytest.raises(LLMKitError, match="unknown method"):
        evaluate(model, CharTok(), [task], EvalConfig(limit=1, prompting="cott"), cache_path=None, progress=False)
