"""The hostile-input matrix (issue 21 item 10): each command with each class of bad input (missing,
empty, corrupt or non-UTF-8 files, NaN/inf/negative/zero numbers, unknown names, an existing output
without --force) answers exit 2 with one `llmkit: error:` line (argparse's own `error:` for its
types) and leaves what was there unchanged; invalid UTF-8 is the documented exception: replaced with
U+FFFD and a warning, and the command succeeds. New commands join the table as they are added."""

import contextlib
import io

import pytest
import torch

from llmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from tests._shared import byte_chat_tokenizer, tiny_llama

    from llmkit.checkpoint import save_checkpoint

    W = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    save_checkpoint(tiny_llama(), W / "model", byte_chat_tokenizer())
    (W / "empty.txt").write_text("")
    (W / "garbage.bin").write_bytes(b"\x00\xff\x13garbage" * 10)
    (W / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    (W / "ok.txt").write_text("hello world\n" * 20)
    (W / "notamodel").mkdir()
    (W / "exists").mkdir()
    (W / "exists" / "x").write_text("keep")
    (W / "pred.txt").write_text("")
    (W / "ref.txt").write_text("")
    (W / "latin1.txt").write_bytes(b"caf\xe9\n")
    (W / "utf8.txt").write_text("caf\u00e9\n")
    return W


def _probes(W):
    m, e = str(W / "model"), str(W)
    return [
        ("score", ["score", "--model", m, "--file", f"{e}/empty.txt"]),
        ("score", ["score", "--model", m, "--file", f"{e}/missing.txt"]),
        ("score", ["score", "--model", m, "--text", "hello there", "--stride", "0"]),
        ("score", ["score", "--model", f"{e}/notamodel", "--text", "hi there"]),
        ("score", ["score", "--model", f"{e}/garbage.bin", "--text", "hi there"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--temperature", "nan"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--temperature", "inf"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--top-p", "0"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--max-new-tokens", "-1"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--presence-penalty", "nan"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--seed", "1e23"]),
        ("generate", ["generate", "--model", m, "--prompt", "hi", "--logprobs", "100000"]),
        ("generate", ["generate", "--model", m, "--adapter", f"{e}/notamodel", "--prompt", "hi"]),
        ("plan", ["plan", "--params", "nan"]),
        ("plan", ["plan", "--params", "inf"]),
        ("plan", ["plan", "--params", "-5"]),
        ("plan", ["plan", "--preset", "nope"]),
        ("metrics", ["metrics", "accuracy", "--predictions", f"{e}/pred.txt", "--references", f"{e}/ref.txt"]),
        ("metrics", ["metrics", "bleu", "--predictions", f"{e}/missing.txt", "--references", f"{e}/ref.txt"]),
        ("quantize", ["quantize", "--model", m, "--method", "int4", "--out", f"{e}/exists"]),
        ("quantize", ["quantize", "--model", f"{e}/garbage.bin", "--method", "int8", "--out", f"{e}/q"]),
        ("merge", ["merge", "--model", m, "--adapter", f"{e}/notamodel", "--out", f"{e}/mm"]),
        ("eval", ["eval", "--model", m, "--tasks", "nope"]),
        ("eval", ["eval", "--model", m, "--task-file", f"{e}/bad.jsonl"]),
        ("eval", ["eval", "--model", m, "--tasks", "arc_easy", "--limit", "-1"]),
        ("eval", ["eval", "--model", m, "--tasks", "arc_easy", "--limit", "1", "--cache", f"{e}/garbage.bin"]),
        ("finetune", ["finetune", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/ft"]),
        ("finetune", ["finetune", "--model", m, "--data", f"{e}/empty.txt", "--out", f"{e}/ft"]),
        ("finetune", ["finetune", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/ft", "optim.lr=nan"]),
        ("finetune", ["finetune", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/ft", "train.eval_every=-1"]),
        ("finetune", ["finetune", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/exists"]),
        ("pretrain", ["pretrain", "optim.beta2=2"]),
        ("pretrain", ["pretrain", "train.steps=0"]),
        ("pretrain", ["pretrain", "data.dir=" + f"{e}/notamodel", f"train.out_dir={e}/pt"]),
        ("pretrain", ["pretrain", "--config", f"{e}/garbage.bin"]),
        ("speedrun", ["speedrun", "--minutes", "nan"]),
        ("speedrun", ["speedrun", "--minutes", "-1"]),
        ("speedrun", ["speedrun", "--out", f"{e}/exists"]),
        ("data prepare", ["data", "prepare", "--input", f"{e}/ok.txt", "--tokenizer", f"{e}/notamodel", "--out", f"{e}/dp"]),
        ("data prepare", ["data", "prepare", "--input", f"{e}/missing.txt", "--tokenizer", m, "--out", f"{e}/dp"]),
        ("data prepare", ["data", "prepare", "--input", f"{e}/ok.txt", "--tokenizer", m, "--out", f"{e}/dp2", "--shard-tokens", "0"]),
        ("data prepare", ["data", "prepare", "--input", f"{e}/ok.txt", "--tokenizer", m, "--out", f"{e}/dp3", "--shard-tokens", "1"]),
        ("tokenizer train", ["tokenizer", "train", "--input", f"{e}/empty.txt", "--vocab-size", "300", "--out", f"{e}/tk"]),
        ("tokenizer train", ["tokenizer", "train", "--input", f"{e}/ok.txt", "--vocab-size", "100000000", "--out", f"{e}/tk"]),
        ("tokenizer train", ["tokenizer", "train", "--input", f"{e}/ok.txt", "--vocab-size", "300", "--out", f"{e}/exists"]),
        ("reward", ["reward", "--model", m, "--input", f"{e}/bad.jsonl"]),
        ("judge", ["judge", "--model", m, "--input", f"{e}/bad.jsonl"]),
        ("prompt", ["prompt", "--model", m, "--method", "nope"]),
        ("sandbox run", ["sandbox", "run", f"{e}/missing.py"]),
        ("sandbox run", ["sandbox", "run", "--timeout", "nan", f"{e}/ok.txt"]),
        ("rag index", ["rag", "index", "--docs", f"{e}/missing", "--index", f"{e}/ix.db"]),
        ("align", ["align", "--method", "dpo", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/al"]),
        ("align", ["align", "--method", "nope", "--model", m, "--data", f"{e}/bad.jsonl", "--out", f"{e}/al"]),
        ("pull", ["pull", "nope-model"]),
    ]


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as ex:  # argparse's own errors
            rc = ex.code
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("llmkit: warning")]


N_PROBES = 54


def test_every_bad_input_is_exit_2_with_one_line(w):
    probes = _probes(w)
    assert len(probes) == N_PROBES
    bad = []
    for name, argv in probes:
        rc, lines = _run(argv)
        ok = rc == 2 and lines and (lines[-1].startswith("llmkit: error:") or "error: argument" in lines[-1])
        if not ok or (w / "exists" / "x").read_text() != "keep" or sorted(p.name for p in (w / "exists").iterdir()) != ["x"]:
            bad.append(f"{name} {argv[1:]}: rc={rc} {lines[-1:] if lines else ''}")
    assert not bad, "\n".join(bad)


def test_invalid_utf8_is_replaced_with_a_warning_and_the_command_succeeds(w, capsys):
    assert main(["metrics", "exact_match", "--predictions", str(w / "latin1.txt"), "--references",
                 str(w / "utf8.txt")]) == 0
    assert main(["score", "--model", str(w / "model"), "--text", "caf\udce9 au lait"]) == 0  # argv's bad byte
    assert "U+FFFD" in capsys.readouterr().err


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["model_config"].update(n_layer="two"), "n_layer must be an integer, got 'two'"),
    (lambda c: c["model_config"].update(vocab_size=10 ** 12), "needs 476,837.2 GiB in fp32"),
    (lambda c: c.clear(), "has no model_config"),
])
def test_corrupt_checkpoint_configs_are_one_line(w, tmp_path, edit, needle):
    import json
    import shutil

    m = tmp_path / "m"
    shutil.copytree(w / "model", m)
    cfg = json.loads((m / "llmkit.json").read_text())
    edit(cfg)
    (m / "llmkit.json").write_text(json.dumps(cfg))
    rc, lines = _run(["score", "--model", str(m), "--text", "hello there"])
    assert rc == 2 and len(lines) == 1 and needle in lines[0]
