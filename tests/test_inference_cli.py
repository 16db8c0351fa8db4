"""`llmkit generate`, `llmkit chat` and `llmkit bench decode` on the real SmolLM2-135M-Instruct GGUF."""

import io
import json

import pytest

from llmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for these tests


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("quant", [["--dtype", "float32"], [], ["--quant", "int4"]], ids=["fp32", "gguf-quantized", "int4"])
def test_generate_chat_answers_paris(capsys, smollm2_gguf, quant):
    rc, out, err = run(capsys, "generate", "--model", str(smollm2_gguf), "--chat", "--temperature", "0",
                       "--prompt", "What is the capital of France?", "--max-new-tokens", "40", *quant)
    assert rc == 0, err
    answer = out.strip()
    assert "Paris" in answer and len(answer.split()) >= 3 and answer[0].isupper()  # a sentence naming Paris


def test_generate_json_stream_and_speculative(capsys, smollm2_gguf):
    common = ["--model", str(smollm2_gguf), "--chat", "--prompt", "Name three colors.", "--max-new-tokens", "12"]
    rc, out, err = run(capsys, "generate", *common, "--json", "--logprobs", "3")
    assert rc == 0, err
    d = json.loads(out)  # exactly one JSON object
    assert set(d) >= {"text", "tokens", "logprobs", "top_logprobs", "finish_reason", "timings", "prompt_tokens"}
    assert len(d["tokens"]) == len(d["logprobs"]) == len(d["top_logprobs"]) <= 12
    assert d["finish_reason"] in ("stop", "length") and d["timings"]["prefill_s"] > 0
    assert all(lp <= 0 for lp in d["logprobs"]) and all(len(t) == 3 for t in d["top_logprobs"])
    rc, streamed, err = run(capsys, "generate", *common, "--stream")
    assert rc == 0 and streamed.rstrip("\n") == d["text"]
    rc, spec, err = run(capsys, "generate", *common, "--draft-layers", "28", "--num-draft-tokens", "3")
    assert rc == 0 and spec.rstrip("\n") == d["text"]  # greedy speculative = greedy
    assert "draft tokens accepted" in err


def test_chat_session(capsys, smollm2_gguf, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\n\n/exit\nnever read\n"))
    rc, out, err = run(capsys, "chat", "--model", str(smollm2_gguf), "--max-new-tokens", "20")
    assert rc == 0, err
    assert "Paris" in out and "history cleared" in err


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--top-k", "-2"], "top_k must be >= 0, got -2"),
    (["--max-new-tokens", "-5"], "max_new_tokens must be >= 0, got -5"),
    (["--stream", "--json"], "--stream and --json cannot be combined"),
])
def test_generate_bad_input_one_line(capsys, argv, needle):
    rc, out, err = run(capsys, "generate", "--model", "no-such-model-needed", "--prompt", "hi", *argv)
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bench_decode_json(capsys, smollm2_gguf):
    rc, out, err = run(capsys, "bench", "decode", "--model", str(smollm2_gguf), "--prompt-tokens", "16",
                       "--new-tokens", "4", "--repeat", "1", "--threads", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    r = d["results"]["llmkit"]
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_mib"] > 0


def test_chat_ctrl_c_stops_the_answer_not_the_session(capsys, smollm2_gguf, monkeypatch):
    import llmkit.inference

    calls = []

    def fake_stream(model, tok, ids, params, **kw):  # first answer interrupted by Ctrl-C mid-way
        calls.append(tok.decode(ids))
        yield "Par"
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield "is"

    monkeypatch.setattr(llmkit.inference, "stream", fake_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Capital of France?\nAgain?\n"))
    rc, out, err = run(capsys, "chat", "--model", str(smollm2_gguf), "--system", "Be brief.")
    assert rc == 0 and "[stopped]" in err and out.splitlines() == ["Par", "Paris"]
    assert "Be brief." in calls[1] and "Capital of France?" in calls[1] and "Par" in calls[1]  # history kept
