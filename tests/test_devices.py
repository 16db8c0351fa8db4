"""`--device auto|cpu|cuda|mps`: one resolver, and the same results on every device present.

On a CPU-only machine the cuda/mps parameters skip; on a machine with a GPU the same test compares
the GPU run against the CPU run (greedy tokens equal, log-probs within fp32 reduction noise).
"""

import json

import pytest
import torch

from llmkit.cli import main
from llmkit.devices import resolve_device
from llmkit.errors import LLMKitError


def _available(name: str) -> bool:
    if name == "cuda":
        return torch.cuda.is_available()
    if name == "mps":
        return torch.backends.mps.is_available()
    return True


DEVICES = [pytest.param(d, marks=pytest.mark.skipif(not _available(d), reason=f"no {d} on this machine"))
           for d in ("cpu", "cuda", "mps")]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny llama checkpoint with a trained byte-level tokenizer. The head is scaled up so the
    greedy choice has wide margins (a random model's near-flat logits would let kernel rounding on
    another device flip an argmax and make token equality a coin toss)."""
    from llmkit.checkpoint import save_checkpoint
    from llmkit.models import ModelConfig, Transformer
    from llmkit.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("dev")
    corpus = d / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tok = Tokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    save_checkpoint(model, d / "ckpt", tok)
    return d / "ckpt"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_resolve_device_names_and_auto_order(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LLMKitError, match=r"^--device cuda: CUDA is not available on this machine$"):
        resolve_device("cuda")
    from llmkit.train.dist import pick_device  # pretraining's train.device goes through the same resolver

    with pytest.raises(LLMKitError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(LLMKitError, match="MPS .* not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")  # MPS before the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")  # CUDA before MPS
    for bad in ("tpu", "cpu:0", "cuda:x"):
        with pytest.raises(LLMKitError, match=f"--device {bad}: not one of auto, cpu, cuda, mps"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", [["generate", "--prompt", "the fox"], ["score", "--text", "the fox"],
                                 ["eval", "--tasks", "arc_easy"], ["chat"]])
def test_cuda_on_a_machine_without_it_is_one_line(capsys, tiny_ckpt, cmd):
    rc, out, err = run(capsys, cmd[0], "--model", str(tiny_ckpt), *cmd[1:], "--device", "cuda")
    assert rc == 2 and out == ""
    assert err == "llmkit: error: --device cuda: CUDA is not available on this machine\n"


def test_generate_and_score_with_device_cpu(capsys, tiny_ckpt):
    common = ["--model", str(tiny_ckpt), "--prompt", "the quick", "--max-new-tokens", "6", "--ignore-eos", "--json"]
    rc, out, err = run(capsys, "generate", *common, "--device", "cpu")
    assert rc == 0, err
    g = json.loads(out)
    rc, out, err = run(capsys, "generate", *common)  # default: auto (= cpu here)
    assert rc == 0 and json.loads(out)["tokens"] == g["tokens"] and len(g["tokens"]) == 6
    rc, out, err = run(capsys, "score", "--model", str(tiny_ckpt), "--text", "the lazy dog", "--json",
                       "--device", "cpu")
    assert rc == 0, err
    assert json.loads(out)["nll"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_same_results_on_every_device(capsys, tiny_ckpt, device):
    """Explicit CPU vs `device` (and vs auto): CLI generate/score, and the engine paths the CLI does
    not reach (ragged batch with n > 1 samples, speculative decoding, the eval harness' trees)."""
    from llmkit.eval.harness import continuation_logprobs
    from llmkit.inference import SamplingParams, generate_batch, speculative_generate, truncated_draft
    from llmkit.loading import load_model

    gen = ["generate", "--model", str(tiny_ckpt), "--prompt", "the quick", "--max-new-tokens", "8",
           "--ignore-eos", "--json"]
    score = ["score", "--model", str(tiny_ckpt), "--text", "the quick brown fox jumps", "--json"]
    res = {}
    for dev in ("cpu", device, "auto"):
        rc, g, err = run(capsys, *gen, "--device", dev)
        assert rc == 0, err
        rc, s, err = run(capsys, *score, "--device", dev)
        assert rc == 0, err
        res[dev] = json.loads(g), json.loads(s)
    for dev in (device, "auto"):
        assert res[dev][0]["tokens"] == res["cpu"][0]["tokens"]
        assert res[dev][1]["tokens"] == res["cpu"][1]["tokens"]
        assert res[dev][1]["logprobs"] == pytest.approx(res["cpu"][1]["logprobs"], abs=1e-3)

    cpu, _ = load_model(str(tiny_ckpt), device="cpu")
    other, _ = load_model(str(tiny_ckpt), device=resolve_device(device))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    p = SamplingParams(max_new_tokens=5, n=2, stop_ids=())
    a = [c.tokens for g in generate_batch(cpu, prompts, p) for c in g.completions]
    b = [c.tokens for g in generate_batch(other, prompts, p) for c in g.completions]
    assert a == b and all(len(t) == 5 for t in a)
    sa = speculative_generate(cpu, truncated_draft(cpu, 1), prompts[0], p.__class__(max_new_tokens=6, stop_ids=()))
    sb = speculative_generate(other, truncated_draft(other, 1), prompts[0],
                              p.__class__(max_new_tokens=6, stop_ids=()))
    assert sa.tokens == sb.tokens
    pairs = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([3], [4, 5])]
    assert continuation_logprobs(other, pairs) == pytest.approx(continuation_logprobs(cpu, pairs), abs=1e-3)
