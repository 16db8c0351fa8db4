"""The compiled decode step (decode_step(..., compiled=True)) over the cache's static view.

Fast tests trace the step with dynamo and a counting eager backend: the same tokens and logits as the
eager path, one graph for every position (positions are tensors, the cache is read whole behind a
mask), and at most one recompile for a new cache length (then a dynamic size). The inductor test (C++
codegen, tens of seconds on 2 cores) runs with LLMKIT_SLOW=1."""

import importlib
import os

import pytest
import torch

from llmkit.inference import SamplingParams, decode_step, generate, generate_batch, prefill
from llmkit.models.cache import StaticKVCache
from llmkit.models.config import ModelConfig
from llmkit.models.transformer import Transformer
from llmkit.quant import fuse_projections, quantize

pytestmark = pytest.mark.usefixtures("one_thread")
gen_mod = importlib.import_module("llmkit.inference.generate")  # the module (the package exports a function of that name)


def tiny(name="tiny-llama", seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_preset(name)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return m


@pytest.fixture
def traced(monkeypatch):
    """decode_step's compiled graph through dynamo with an eager backend that counts compilations."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(gen_mod, "_compiled_step", lambda device_type="cpu": torch.compile(gen_mod._step, backend=backend))
    yield graphs
    torch._dynamo.reset()


SLOW = pytest.mark.skipif(not os.environ.get("LLMKIT_SLOW"), reason="slow: set LLMKIT_SLOW=1")


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("tiny-gpt2", marks=SLOW)])
def test_compiled_greedy_equals_eager_one_graph(traced, name):
    m = tiny(name)
    prompt = list(range(3, 20))
    sp = SamplingParams(max_new_tokens=24)
    eager = generate(m, prompt, sp)
    comp = generate(m, prompt, sp, compiled=True)
    assert comp.tokens == eager.tokens
    assert comp.completions[0].logprobs == pytest.approx(eager.completions[0].logprobs, abs=1e-4)
    assert len(traced) == 1  # 23 positions, one graph: no recompilation per position
    generate(m, prompt[:5], SamplingParams(max_new_tokens=40), compiled=True)  # another cache length
    generate(m, prompt[:9], SamplingParams(max_new_tokens=31), compiled=True)  # and another
    assert len(traced) <= 2  # the second length made the slot count a dynamic size; the third reuses it


@SLOW
def test_compiled_batched_ragged_rows_equal_eager(traced):
    """Rows at different positions (ragged prompts) decode together through the compiled step."""
    m = tiny()
    prompts = [list(range(5, 5 + n)) for n in (4, 11, 7)]
    sp = SamplingParams(max_new_tokens=12)
    eager = generate_batch(m, prompts, sp)
    comp = generate_batch(m, prompts, sp, compiled=True)
    assert [g.tokens for g in comp] == [g.tokens for g in eager]


def _compare_steps(m, ids, cache_len, positions, pair=None, tok=None, tol=1e-4):
    """Prefill ids into an eager and a compiled cache (or continue `pair`), decode greedily at `positions`
    through both and check the logits agree; returns (eager cache, compiled cache, next token)."""
    if pair is None:
        pair = m.new_cache(1, cache_len), m.new_cache(1, cache_len)
        for c in pair:
            prefill(m, ids, c)
    tok = torch.tensor([42]) if tok is None else tok
    for pos in positions:
        a = decode_step(m, tok, torch.tensor([pos]), pair[0])
        b = decode_step(m, tok, torch.tensor([pos]), pair[1], compiled=True)
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
        tok = a.argmax(-1)
    return pair[0], pair[1], tok


def test_compiled_step_logits_and_quantized(traced):
    """Quantized (int4 kernel, fused projections) step logits: compiled == eager to float tolerance."""
    m = tiny()
    quantize(m, "int4")
    fuse_projections(m)
    _, cb, _ = _compare_steps(m, torch.tensor([[5, 9, 11, 200, 3, 7]]), 16, range(6, 12), tol=1e-3)
    assert len(traced) == 1
    assert isinstance(cb.static(), StaticKVCache) and cb.static().k.data_ptr() == cb.k.data_ptr()  # a view: same storage


def test_compiled_steps_after_a_caches_first_skip_the_guards(traced, monkeypatch):
    """A cache's first compiled step goes through dynamo (guards checked); its later steps run the matched
    cache entry's bytecode directly (`_unguarded`) and still equal eager. Another model on the same cache
    changes the key: guarded again, and its own weights are used."""
    import copy

    m = tiny()
    compiled, guarded = gen_mod._compiled_step(), []

    def counting(*args):
        guarded.append(1)
        return compiled(*args)

    monkeypatch.setattr(gen_mod, "_compiled_step", lambda device_type="cpu": counting)
    ca, cb, tok = _compare_steps(m, torch.tensor([[5, 9, 11, 200, 3, 7]]), 16, range(6, 11))
    assert len(guarded) == 1 and cb.static(64)._unguarded[1] is not None
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(1.5)
    _compare_steps(m2, None, 16, [11], pair=(ca, cb), tok=tok)
    assert len(guarded) == 2


def test_compiled_step_reads_the_cache_in_buckets(traced):
    """The compiled step attends over the slots up to the next multiple of STATIC_BUCKET, through one view
    per bucket; crossing buckets neither recompiles (the slot count is dynamic from the first compile)
    nor changes the logits."""
    m = tiny()
    _, cb, _ = _compare_steps(m, torch.tensor([list(range(3, 63))]), 160, range(60, 140))  # crosses 64, 128
    assert len(traced) == 1
    assert sorted(cb._static[2]) == [64, 128, 160]


def test_compiled_step_checks_positions(traced):
    from llmkit.errors import LLMKitError

    m = tiny()
    c = m.new_cache(1, 8)
    with pytest.raises(LLMKitError, match="past the cache"):
        decode_step(m, torch.tensor([1]), torch.tensor([8]), c, compiled=True)


@SLOW  # inductor's C++ compile: tens of seconds on 2 cores
def test_inductor_compiled_equals_eager():
    import torch._dynamo

    torch._dynamo.reset()
    m = tiny()
    prompt = list(range(3, 20))
    sp = SamplingParams(max_new_tokens=16)
    eager = generate(m, prompt, sp)
    comp = generate(m, prompt, sp, compiled=True)
    assert comp.tokens == eager.tokens
    assert comp.completions[0].logprobs == pytest.approx(eager.completions[0].logprobs, abs=1e-3)
