"""Foundation CLI: `llmkit score`, `llmkit pull`, checkpoints, and bad input -> one line, exit 2."""

import json
import math
import subprocess
import sys

import pytest
import torch

from llmkit.checkpoint import load_checkpoint, save_checkpoint
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.models import ModelConfig, Transformer


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "llmkit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("pull", "score"):
        assert cmd in proc.stdout


def test_score_json_schema_and_values(capsys, smollm2_gguf, smollm2):
    model, tok = smollm2
    text = "The capital of France is Paris. It is known for the Eiffel Tower."
    rc, out, _ = run_cli(capsys, "score", "--model", str(smollm2_gguf), "--text", text, "--json")
    assert rc == 0
    res = json.loads(out)  # exactly one JSON object on stdout
    assert set(res) == {"tokens", "logprobs", "nll", "perplexity", "bits_per_byte"}
    assert res["tokens"] == tok.encode(text)
    assert len(res["logprobs"]) == len(res["tokens"]) - 1
    nll = -sum(res["logprobs"])
    assert res["nll"] == pytest.approx(nll, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(nll / len(res["logprobs"])), rel=1e-6)
    first = tok.decode(res["tokens"][:1])
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / (len(text) - len(first)), rel=1e-6)


def test_pull_prints_path(capsys, smollm2_gguf):
    rc, out, _ = run_cli(capsys, "pull", "smollm2-135m-instruct")
    assert rc == 0 and out.strip() == str(smollm2_gguf)


@pytest.mark.parametrize("argv, needle", [
    (["score", "--model", "no-such-model", "--text", "hi there"], "known models: smollm2-135m-instruct"),
    (["score", "--model", "/", "--text", "hi there"], "is not an HF model directory"),
    (["pull", "smollm3"], "unknown model 'smollm3'"),
])
def test_bad_model_specs(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_text_and_bad_files(capsys, tmp_path, smollm2_gguf):
    rc, _, err = run_cli(capsys, "score", "--model", str(smollm2_gguf), "--text", "   ")
    assert rc == 2 and "empty text" in err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 caf\xe9")  # invalid UTF-8: U+FFFD and a warning (text.py)
    rc, _, err = run_cli(capsys, "score", "--model", str(smollm2_gguf), "--file", str(tmp_path / "bin.txt"))
    assert rc == 0 and "bin.txt:1: invalid UTF-8 replaced with U+FFFD" in err
    rc, _, err = run_cli(capsys, "score", "--model", str(smollm2_gguf), "--file", str(tmp_path / "missing.txt"))
    assert rc == 2 and "file not found" in err
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    rc, _, err = run_cli(capsys, "score", "--model", str(tmp_path / "x.gguf"), "--text", "hello there")
    assert rc == 2 and "not a GGUF file" in err


def test_checkpoint_round_trip_atomic_and_no_overwrite(tmp_path, capsys):
    from llmkit.tokenizer import Tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the quick brown fox. " * 50)
    tok = Tokenizer.train([corpus], vocab_size=300)
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)
    m = Transformer(cfg).eval()
    out = tmp_path / "ckpt"
    save_checkpoint(m, out, tok, meta={"config": {"lr": 1e-3}})
    with pytest.raises(LLMKitError, match="already exists"):
        save_checkpoint(m, out, tok)
    m2, meta = load_checkpoint(out)
    assert meta == {"config": {"lr": 1e-3}}
    ids = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    # the checkpoint is also a valid `--model` for every command
    rc, res, _ = run_cli(capsys, "score", "--model", str(out), "--text", "hello world, the quick fox", "--json")
    assert rc == 0 and json.loads(res)["nll"] > 0
    # a corrupt safetensors file is named, not a traceback
    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    rc, _, err = run_cli(capsys, "score", "--model", str(out), "--text", "hello world")
    assert rc == 2 and "model.safetensors" in err and "not a readable safetensors" in err


def test_malloc_thresholds_low_only_while_loading(monkeypatch):
    """The 1 MiB mmap threshold (load-time temporaries back to the OS) holds only inside a load; the steady
    state, set again after the load even when it fails, keeps freed buffers (a 1 MiB threshold for the whole
    process made every training step's activations fresh page-faulted mmaps: bench train 2x slower)."""
    import llmkit.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_set_malloc", lambda *a: calls.append(a))
    with cli.returning_freed_buffers():
        assert calls == [(1 << 20,)]
    assert calls[-1] == (256 << 20, 512 << 20)
    calls.clear()
    with pytest.raises(LLMKitError):
        with cli.returning_freed_buffers():
            raise LLMKitError("no such model")
    assert calls == [(1 << 20,), (256 << 20, 512 << 20)]
