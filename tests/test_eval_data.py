"""`llmkit eval` without a source checkout: the packaged task subsets, a clear error naming
--task-file for a task that is not packaged, and `--adapter` like every other --model command."""

import json

import pytest
import torch

from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.eval.tasks import BUILTIN, get_task, packaged_data_dir

PACKAGED = ["arc_easy", "arc_challenge", "boolq", "commonsense_qa", "winogrande", "mmlu", "mmlu_cloze", "gsm8k", "svamp"]


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LLMKIT_SHARED_DATA", str(empty))
    return empty


def test_builtin_tasks_load_from_the_package(no_shared_data):
    for name in PACKAGED + ["mmlu:anatomy", "mmlu_cloze:astronomy"]:
        t = get_task(name)
        assert t.docs and t.source.startswith(str(packaged_data_dir())), name
        assert t.to_example(t.docs[0], t.fewshot_prefix(0, 1))  # prompts build, k-shot pool present
    assert len(get_task("mmlu").subjects) == 57 and len(get_task("mmlu:anatomy").docs) == 20
    for name in set(BUILTIN) - set(PACKAGED):  # not redistributable: a one-line error naming --task-file
        with pytest.raises(LLMKitError, match=rf"no data for task {name}: .*--task-file FILE.jsonl"):
            get_task(name)
    src = (packaged_data_dir() / "SOURCE.md").read_text()
    assert all(f"{n}" in src for n in ("arc_easy", "boolq", "commonsense_qa", "winogrande", "mmlu", "gsm8k", "piqa"))


def test_packaged_subsets_are_the_first_rows_of_the_full_sets(shared_data):
    """The shared copy wins when present; the subset's documents are its first N, unchanged."""
    for name in PACKAGED + ["mmlu:anatomy"]:
        full, sub = get_task(name, shared_data), get_task(name, packaged_data_dir())
        n = len(sub.docs)
        strip = (lambda ds: [{k: v for k, v in d.items() if k != "_line"} for d in ds])
        if name.startswith("mmlu"):  # per subject: the first 20 test rows
            for s in sub.subjects:
                a = [d for d in full.docs if d["subject"] == s][:20]
                assert strip(a) == strip([d for d in sub.docs if d["subject"] == s])
        else:
            assert 0 < n < len(full.docs) and strip(full.docs[:n]) == strip(sub.docs)
    assert get_task("arc_easy").source.startswith(str(shared_data))  # default: the full shared copy


def test_a_task_missing_everywhere_names_task_file(no_shared_data, tmp_path, capsys):
    assert main(["eval", "--model", "unused", "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no data for task piqa" in err and "--task-file" in err


def _tiny_with_adapter(d):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.models import ModelConfig, Transformer
    from llmkit.peft import apply_lora, save_adapter
    from llmkit.tokenizer import Tokenizer

    corpus = d / "c.txt"
    corpus.write_text("the cat sat on the mat. a dog ran in the park. " * 30)
    tok = Tokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)).eval()
    save_checkpoint(base, d / "base", tok)
    model = apply_lora(base, targets=["q_proj", "v_proj"], r=2, alpha=4.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:  # B starts at zero: make the adapter change the scores
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, d / "ad")
    return d / "base", d / "ad"


def test_eval_takes_an_adapter(tmp_path, capsys):
    from llmkit.eval.harness import EvalConfig, evaluate
    from llmkit.loading import load_model

    base, ad = _tiny_with_adapter(tmp_path)
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"query": q, "choices": ["mat", "park", "dog"], "gold": g}) + "\n"
                            for q, g in [("the cat sat on the", 0), ("a dog ran in the", 1), ("the cat saw a", 2)]))

    def cli(*extra):
        rc = main(["eval", "--model", str(base), "--task-file", str(task), "--no-cache", "--out",
                   str(tmp_path / f"run{len(extra)}"), "--json", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return [ll for r in map(json.loads, (tmp_path / f"run{len(extra)}" / "samples" / "toy.jsonl").open())
                for ll in r["ll"]]

    with_adapter, without = cli("--adapter", str(ad)), cli()
    model, tok = load_model(str(base), adapter=str(ad))
    from llmkit.eval.tasks import task_from_file

    ref = evaluate(model, tok, [task_from_file(task)], EvalConfig(), cache_path=None)["samples"]["toy"]
    assert with_adapter == pytest.approx([ll for r in ref for ll in r["ll"]], abs=1e-5)  # the adapted model
    assert max(abs(a - b) for a, b in zip(with_adapter, without)) > 1e-3
    assert main(["eval", "--model", str(base), "--adapter", str(tmp_path / "nope"), "--task-file", str(task),
                 "--no-cache"]) == 2
