"""`llmkit plan`: MoE presets plan compute on active parameters and memory on all of them; a named
GPU gives the peak; --gpus without any speed is refused instead of printing 0 tokens/s."""

import json

import pytest
import torch

from llmkit.cli import main
from llmkit.train.mfu import CUDA_PEAKS


def _mixtral_by_hand() -> tuple[int, int]:
    """(total, active) parameters of Mixtral-8x7B (Jiang et al. 2024: 46.7B total, 12.9B active), from
    its published shape: 32 layers, d 4096, 32 query / 8 KV heads of 128, 8 SwiGLU experts of 14336,
    2 routed per token, vocab 32000, untied embeddings."""
    C, L, F, V, E, K = 4096, 32, 14336, 32000, 8, 2
    attn = C * 4096 + 2 * C * 1024 + 4096 * C  # q, k, v, o
    expert = 3 * C * F  # gate, up, down
    rest = C * E + 2 * C  # router + the two RMSNorms
    outer = C + 2 * V * C  # final norm, embedding, head
    return L * (attn + E * expert + rest) + outer, L * (attn + K * expert + rest) + outer


def plan_json(capsys, *argv):
    rc = main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_moe_plan_uses_active_parameters_for_compute(capsys):
    total, active = _mixtral_by_hand()
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (46.7, 12.9)
    p = plan_json(capsys, "--preset", "mixtral-8x7b", "--gpus", "8", "--gpu", "H100")
    assert p["params"] == total and p["active_params"] == active
    assert p["tokens"] == 20 * active and p["flops"] == pytest.approx(6 * active * 20 * active)
    assert p["tokens_per_s"] == pytest.approx(8 * 989e12 * 0.4 / (6 * active))  # ~41k tokens/s
    assert p["seconds"] == pytest.approx(20 * active / p["tokens_per_s"])  # ~73 days, not 43 million
    assert p["memory_bytes"]["fp32 AdamW"]["total"] == 16 * total  # every expert is held in memory
    dense = plan_json(capsys, "--preset", "tiny-llama", "--tokens-per-s", "1e4")
    assert dense["active_params"] == dense["params"] and dense["tokens"] == 20 * dense["params"]


@pytest.mark.parametrize("name,peak", [("h100", 989e12), ("A100", 312e12), ("rtx-4090", 165e12), ("L4", 121e12),
                                       ("H200", 989e12)])
def test_named_gpu_peak(capsys, name, peak):
    assert CUDA_PEAKS[{"h100": "H100", "rtx-4090": "RTX 4090"}.get(name, name)] == peak
    p = plan_json(capsys, "--params", "1B", "--gpu", name, "--mfu", "0.5")
    assert p["tokens_per_s"] == pytest.approx(peak * 0.5 / 6e9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the local GPU's peak is used")
@pytest.mark.parametrize("argv,needle", [
    (["--gpus", "8"], "--gpus 8 needs the GPUs' speed: give --gpu NAME (e.g. H100), --peak-tflops or --tokens-per-s"),
    (["--gpu", "B9000"], "--gpu B9000: unknown GPU; known: H200"),
    (["--gpu", "H100", "--peak-tflops", "100"], "give either --gpu or --peak-tflops, not both"),
])
def test_plan_refuses_with_one_line(capsys, argv, needle):
    rc = main(["plan", "--preset", "mixtral-8x7b", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and needle in err and err.count("\n") == 1
