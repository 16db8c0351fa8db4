"""llmkit.quant: the QuantLinear of every method, its state dict, fusing, quantized checkpoints and the CLI."""

import copy
import json

import pytest
import torch

from llmkit.checkpoint import load_checkpoint, save_checkpoint
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.models import ModelConfig, Transformer
from llmkit.models.modules import concat_linears
from llmkit.quant import METHODS, QuantLinear, fuse_projections, keep_dense_copy, quantize
from llmkit.quant import SMALL_M_NO_COPY
from llmkit.quant.methods import _int4_quantize

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for these tests


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-llama", d_model=64, d_ff=128, **kw)).eval()


@pytest.mark.parametrize("N", [16, 48, 64, 80, 112, 192])
def test_int4_storage_survives_torch_cpu_packing(N):
    """torch packs int4 in a CPU-dependent layout (blocks of 64 rows with AVX512, shorter last block
    paired differently); the state dict must give back exactly the portable codes that went in."""
    w = torch.randn(N, 96)
    want = _int4_quantize(w)
    q = QuantLinear("int4", 96, N, tensors=want)
    got = q.storage()
    assert torch.equal(got["qweight"], want["qweight"]) and torch.equal(got["scales"], want["scales"])
    # the dequantized weight is the Q4_1 formula s * q + m on the portable codes
    codes = torch.stack([want["qweight"] & 15, want["qweight"] >> 4], -1).reshape(N, 96).float()
    s, z = want["scales"].float()[..., 0].t(), want["scales"].float()[..., 1].t()  # (N, K/32)
    ref = (codes.view(N, 3, 32) - 8) * s[..., None] + z[..., None]
    torch.testing.assert_close(q.dequantize(), ref.reshape(N, 96))  # fp32 round-off of q s + (z - 8 s)


@pytest.mark.parametrize("method", list(METHODS))
def test_quant_linear_paths_agree_and_hold_no_full_precision_copy(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    q = QuantLinear.from_linear(lin, method)
    if method != "bf16":  # bf16 is the dense 16-bit weight itself (GGUF Q5/Q6 load into it)
        assert all(b.numel() < 128 * 64 or not b.is_floating_point() for b in q.buffers())  # no fp copy of W
    w = q.dequantize()
    assert float(((w - lin.weight).norm() / lin.weight.norm()).detach()) < 0.12  # quantization error, not garbage
    for rows in (1, 3, 20, 80, SMALL_M_NO_COPY + 4):  # kernel (few rows) and per-call dequantized GEMM (many rows)
        x = torch.randn(rows, 128)
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w, lin.bias), atol=0.05, rtol=0.02)
    # the opt-in dense copy for prefill gives the per-call dequantized GEMM's result (past SMALL_M_NO_COPY rows)
    x = torch.randn(SMALL_M_NO_COPY + 4, 128)
    with torch.no_grad():
        per_call = q(x)
        keep_dense_copy(torch.nn.Sequential(q))
        assert q.dense is not None and torch.equal(q(x), per_call)
        keep_dense_copy(torch.nn.Sequential(q), False)
    # gradients reach the input through the custom autograd function: dx = dy W
    x = torch.randn(5, 128, requires_grad=True)
    gy = torch.randn(5, 64)
    q(x).backward(gy)
    torch.testing.assert_close(x.grad, gy @ w, atol=1e-4, rtol=1e-4)
    # .to(dtype) casts nothing the kernels need in their own dtype
    dtypes = {k: v.dtype for k, v in q.tensors().items()}
    q.to(torch.float32)
    assert {k: v.dtype for k, v in q.tensors().items()} == dtypes


@pytest.mark.parametrize("method", list(METHODS))
def test_fusing_quantized_rows(method):
    """q/k/v fused by concatenating quantized rows: exact for int8 (per row) and int4 (per-row groups);
    NF4 re-quantizes its 8-bit double-quantised block scales."""
    torch.manual_seed(0)
    parts = [QuantLinear.from_linear(torch.nn.Linear(64, n), method) for n in (64, 32, 32)]
    fused = concat_linears(parts)
    assert isinstance(fused, QuantLinear) and fused.out_features == 128
    want = torch.cat([p.dequantize() for p in parts])
    if method == "nf4":
        assert float((fused.dequantize() - want).abs().max() / want.abs().max()) < 0.01
    else:
        assert torch.equal(fused.dequantize(), want)
    assert concat_linears([parts[0], torch.nn.Linear(64, 8)]) is None  # mixed kinds stay separate


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", list(METHODS))
def test_quantized_checkpoint_round_trip(tmp_path, method, tie):
    model = quantize(tiny(tie_embeddings=tie), method)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = model(x)
    save_checkpoint(model, tmp_path / "q")
    info = json.loads((tmp_path / "q" / "llmkit.json").read_text())
    assert info["quantization"]["method"] == method
    assert info["quantization"]["layers"]["layers.0.self_attn.q_proj"] == method
    loaded, _ = load_checkpoint(tmp_path / "q")
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    if tie and "lm_head" not in info["quantization"]["layers"]:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    with pytest.raises(LLMKitError, match="unknown quantization 'int3'"):
        info["quantization"]["layers"]["lm_head"] = "int3"
        (tmp_path / "q" / "llmkit.json").write_text(json.dumps(info))
        load_checkpoint(tmp_path / "q")


def test_quantize_leaves_adapters_and_refuses_unknown():
    with pytest.raises(LLMKitError, match="unknown quantization 'int5'"):
        quantize(tiny(), "int5")
    model = quantize(tiny(), "int4")
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)  # not fused
    fuse_projections(model)
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantLinear)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_cli_writes_checkpoint_generate_loads_quantized(capsys, tmp_path, smollm2_gguf):
    from llmkit.loading import load_model

    out = tmp_path / "smollm2-int4"
    rc, _, err = run(capsys, "quantize", "--model", smollm2_gguf, "--method", "int4", "--out", out)
    assert rc == 0, err
    rc, _, err = run(capsys, "quantize", "--model", smollm2_gguf, "--method", "int4", "--out", out)
    assert rc == 2 and "exists" in err
    model, tok = load_model(str(out))
    fly, _ = load_model(str(smollm2_gguf), quant="int4", with_tokenizer=False)
    kinds = {m.method.name for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"int4", "int8"}  # int8: the head
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(model(ids), fly(ids))  # the checkpoint is exactly the on-the-fly quantization
    rc, text, err = run(capsys, "generate", "--model", out, "--chat", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "16")
    assert rc == 0 and "Paris" in text, err


def test_generate_llama_adapter_on_int8(capsys, tmp_path, smollm2, smollm2_gguf):
    """Used to crash with AttributeError 'q_proj': quantize fused q/k/v under the adapter."""
    from llmkit.peft import apply_llama_adapter, save_adapter

    model = apply_llama_adapter(copy.deepcopy(smollm2[0]), adapter_len=4, n_layers=2)
    with torch.no_grad():
        for layer in model.layers[-2:]:
            layer.self_attn.adaption_gate.fill_(0.1)
    save_adapter(model, tmp_path / "la")
    rc, text, err = run(capsys, "generate", "--model", smollm2_gguf, "--adapter", tmp_path / "la", "--quant", "int8",
                        "--prompt", "The capital of France is", "--max-new-tokens", "5", "--json")
    assert rc == 0, err
    assert len(json.loads(text)["tokens"]) == 5


@pytest.mark.parametrize("B,H,KH,S,D", [(1, 9, 3, 277, 64), (8, 9, 3, 33, 64), (2, 6, 6, 13, 32), (3, 8, 2, 2500, 128),
                                         (2, 4, 1, 5, 16)])
def test_native_decode_attention_matches_sdpa(B, H, KH, S, D):
    """llmkit's C decode attention (one query per row over KV-cache slices, grouped-query heads) against
    torch's SDPA: without a mask, with a per-row and a shared bool mask, with an explicit scale; slot counts
    that are not a multiple of 8 and one past the kernel's on-stack scores (2,048). Then a model's eager
    decode through `sdpa` (which routes a decode step's attention there on CPUs that use these kernels)
    equals its full forward."""
    import torch.nn.functional as F

    from llmkit.models import ModelConfig, Transformer
    from llmkit.quant import native

    if native._lib() is None:
        pytest.skip("llmkit's C kernels do not build here (not x86 with AVX2, or no C compiler)")
    torch.manual_seed(S)
    q = torch.randn(B, H, 1, D) * 2
    cache = torch.randn(2, B, KH, S + 7, D)  # slots past S: a cache's unread tail
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    m = torch.rand(B, 1, 1, S) > 0.4
    m[..., -1] = True
    for mask, scale in ((None, None), (m, None), (m[:1], 0.3), (None, 0.05)):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=KH != H)
        out = native.attn_decode(q, k, v, mask, scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # fp32 rounding (exp, sums in another order)
    assert native.attn_decode(q.double(), k.double(), v.double(), None, None) is None  # not its dtype: torch's
    assert native.attn_decode(q, k.transpose(2, 3), v.transpose(2, 3), None, None) is None  # nor layout
    if native.available() and B == 2:
        model = Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=64, n_layer=2, d_model=H * D,
                                                    n_head=H, n_kv_head=KH, d_ff=64, max_seq_len=64)).eval()
        ids = torch.randint(0, 64, (B, 12))
        with torch.inference_mode():
            full = model(ids)
            c = model.new_cache(B, 16)
            model(ids[:, :8], input_pos=torch.arange(8), cache=c)
            steps = [model(ids[:, t:t + 1], input_pos=torch.tensor([t]), cache=c) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 130])
def test_native_kernels_match_the_dequantized_matmul(rows):
    """llmkit's C kernels (llmkit/quant/_kernels.c, used on AVX2 CPUs without AVX-512) against the fp32
    matmul of the dequantized weight: int4 with x quantized to int16 per group of 32 (2^-16 of the group's
    largest value) at every row count (8 rows per pass: rows 9 and 130 leave partial ones), each row of a batch
    within fp32 summation order of the same row alone, int8 with fp32 x. Shapes cover a group count that is not a multiple of 8 (K = 96: 3)
    and an odd row count for int8's 4-row tiles. Run wherever the library builds (any x86 CPU with AVX2),
    whether or not this CPU's int4/int8 layers use it."""
    from llmkit.quant import native
    from llmkit.quant.methods import _int4_codes

    if native._lib() is None:
        pytest.skip("llmkit's C kernels do not build here (not x86 with AVX2, or no C compiler)")
    torch.manual_seed(rows)
    for K in (96, 256):
        x = torch.randn(rows, K) * torch.rand(1, K) * 4  # uneven magnitudes across groups
        t = _int4_quantize(torch.randn(48, K))
        codes = _int4_codes(t["qweight"]).float().view(48, K // 32, 32) - 8
        sc = t["scales"].float()  # (K/32, N, 2)
        w = (codes * sc[..., 0].t()[..., None] + sc[..., 1].t()[..., None]).reshape(48, K)
        y = native.int4_mm(x, t["qweight"], t["scales"].transpose(0, 1).contiguous(), 48)
        # the C dequantization (prefill's path past NATIVE_INT4_MAX_ROWS) is the same formula, one FMA a weight
        wc = native.int4_dequantize(t["qweight"], t["scales"].transpose(0, 1).contiguous(), 48, K)
        torch.testing.assert_close(wc, w, atol=1e-6, rtol=1e-6)
        # rounding x to int16 moves each input by at most half a step, max|x| of its group / 65534
        step = x.abs().view(rows, K // 32, 32).amax(-1).repeat_interleave(32, 1) / 65534
        bound = step @ w.abs().t() + 1e-5 * (x.abs() @ w.abs().t())  # + fp32 sums
        err = (y - x @ w.t()).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        # a row's result does not depend on the rows batched with it (the same int16 x), up to the order of
        # the fp32 sums (1-2 rows keep two sets of sums, 3+ rows one)
        alone = torch.cat([native.int4_mm(x[r:r + 1], t["qweight"], t["scales"].transpose(0, 1).contiguous(), 48)
                           for r in range(rows)])
        assert bool(((y - alone).abs() <= 1e-5 * (x.abs() @ w.abs().t())).all())
        assert float(bound.max()) < 1e-3 * float((x.abs() @ w.abs().t()).max())  # the bound itself is tight
        q8 = torch.randint(-127, 128, (37, K), dtype=torch.int8)
        s8 = torch.rand(37).to(torch.bfloat16)
        w8 = q8.float() * s8.float()[:, None]
        err = (native.int8_mm(x, q8, s8) - x @ w8.t()).abs()
        assert bool((err <= 1e-5 * (x.abs() @ w8.abs().t())).all())  # fp32 sums in another order
