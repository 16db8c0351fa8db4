"""Post-training quantization grid, outlier-aware mode, QAT (llmkit.quant.methods / calibrate / qat) and
`llmkit quantize`'s bad-input errors."""

import itertools
import json

import pytest
import torch

from llmkit.checkpoint import load_checkpoint, save_checkpoint
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.quant import QuantLinear, fuse_projections, quantize
from llmkit.quant.calibrate import activation_absmax
from llmkit.quant.methods import PTQ_BITS, PTQ_GRAINS, get_method, pack_bits, unpack_bits
from llmkit.quant.qat import FakeQuantLinear, convert_qat, prepare_qat
from tests._shared import byte_chat_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [f"int{b}-{s}-{g}" for b, s, g in itertools.product(PTQ_BITS, ("sym", "asym"), PTQ_GRAINS)]


def _groups(w, grain):
    N, K = w.shape
    return w.reshape(1, 1, N * K) if grain == "tensor" else w.reshape(N, -1, K if grain == "channel" else int(grain[1:]))


@pytest.mark.parametrize("bits", PTQ_BITS)
def test_pack_bits_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (6, 128))
    packed = pack_bits(codes, bits)
    assert packed.shape == (6, 128 * bits // 8) and packed.dtype == torch.uint8  # 3 bits take 3 bits
    assert torch.equal(unpack_bits(packed, bits, 128), codes)


@pytest.mark.parametrize("name", GRID)
def test_quantize_dequantize_error_bound(name):
    """Round to nearest: every weight within half a step of its group's grid (sym: + what clamping to
    the fp16-rounded absmax scale adds; asym: the zero-point's rounding can add another half step)."""
    bits, sym, grain = int(name[3]), "-sym-" in name, name.rsplit("-", 1)[1]
    torch.manual_seed(bits)
    w = torch.randn(16, 256) * torch.rand(16, 1) * 0.1
    rec = get_method(name)
    t = rec.quantize(w)
    err = (rec.dequantize(t, 16, 256, torch.float32) - w).abs()
    s = t["scales"].float()[..., None]  # (R, G, 1)
    g = _groups(w, grain)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        bound = s / 2 + (g.abs().amax(-1, keepdim=True) - qmax * s).clamp_min(0)
    else:
        bound = s
    assert (_groups(err, grain) <= bound * (1 + 1e-3) + 1e-7).all()
    # and the error is the expected size: the step, not garbage
    assert float(err.mean()) < float(s.mean())
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {k: (tuple(s), d) for k, (s, d) in
                                                                      rec.shapes(16, 256).items()}


def test_blockwise_absmax_equals_hand_computation():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 8 + [2.0, 1.0, -0.3, 0.1] * 8])  # (1, 64): two blocks of 32
    t = get_method("int8-sym-b32").quantize(w)
    s = torch.tensor([[1.0 / 127, 2.0 / 127]]).half()  # absmax of each block / 127
    assert torch.equal(t["scales"], s)
    q = torch.cat([torch.round(w[0, :32] / s[0, 0].float()), torch.round(w[0, 32:] / s[0, 1].float())])
    assert torch.equal(t["qweight"][0].long() - 128, q.long())  # stored offset by 2^(b-1)
    assert int(q.abs().max()) == 127
    # asymmetric 4-bit, one block: s = (max - min) / 15, z = round(-min / s)
    t = get_method("int4-asym-b32").quantize(w[:, 32:])
    s = ((2.0 - -0.3) / 15)
    assert t["scales"].float().item() == pytest.approx(s, rel=1e-3)
    assert t["zeros"].item() == round(0.3 / t["scales"].float().item())


def test_nf4_blocks_64_and_256_equal_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(96, 512)
    for bs in (64, 256):
        q, st = bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
        theirs = bnbf.dequantize_4bit(q, st)
        ours = get_method(f"nf4-b{bs}-dq").roundtrip(w)
        # identical codes; the 8-bit scales may differ on rare ties (test_peft_nf4 checks both in detail)
        assert (ours - theirs).abs().max() < 1e-2 * w.abs().max()
        assert float((ours != theirs).float().mean()) < 0.02


def test_outlier_path_exact_where_no_outliers_and_keeps_outlier_columns():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    act = torch.rand(128)
    out = [5, 40, 77]
    act[out] = 20.0  # three outlier features
    base, rec = get_method("int8-sym-channel"), get_method("int8-sym-channel-o3")
    t = rec.quantize(w, act)
    assert t["outlier_idx"].tolist() == out
    got = rec.dequantize(t, 64, 128, torch.float32)
    assert torch.equal(got[:, out], w[:, out].half().float())  # outlier columns in fp16
    # elsewhere: the base method's quantization of W with those columns zeroed; where the zeroed columns
    # did not hold a row's absmax the scale is unchanged, so those rows are exactly the plain base's
    rest = w.clone()
    rest[:, out] = 0
    keep = [j for j in range(128) if j not in out]
    assert torch.equal(got[:, keep], base.roundtrip(rest)[:, keep])
    same = w.abs().argmax(1).apply_(lambda j: j not in out).bool()
    assert same.any() and torch.equal(got[same][:, keep], base.roundtrip(w)[same][:, keep])
    # the forward: x_rest W_base^T + x_out W_out^T
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    q = QuantLinear.from_linear(lin, rec, act)
    x = torch.randn(3, 128)
    want = x[:, keep] @ got[:, keep].t() + x[:, out] @ w[:, out].half().float().t()
    torch.testing.assert_close(q(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(LLMKitError, match="needs calibration"):
        QuantLinear.from_linear(lin, rec)


def test_outlier_aware_beats_plain_on_outlier_activations():
    """Activation outliers (a few feature dims 30x larger, as LLM.int8 finds in LLMs): keeping their
    weight columns in fp16 cuts the output error of 4-bit weights by more than the extra bits' worth."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(512, 256)
    x[:, [3, 100, 200, 201]] *= 30
    act = x.abs().amax(0)  # (K,): what calibration records for this linear
    y = lin(x).detach()
    err = {n: float((QuantLinear.from_linear(lin, n, act if "-o" in n else None)(x) - y).norm() / y.norm())
           for n in ("int4-sym-b32", "int4-sym-b64-o4", "int4-sym-b128-o4")}
    assert err["int4-sym-b64-o4"] < err["int4-sym-b32"] / 2  # 4.42 bits/weight vs 4.5
    assert err["int4-sym-b128-o4"] < err["int4-sym-b32"] / 2  # 4.38 vs 4.5


def test_calibration_and_outlier_checkpoint_round_trip(tmp_path):
    model = tiny_llama().eval()
    ids = list(range(10, 200))
    stats = activation_absmax(model, ids, seq_len=64)
    assert stats["layers.0.self_attn.q_proj"].shape == (model.cfg.d_model,)
    assert torch.equal(stats["layers.0.self_attn.q_proj"], stats["layers.0.self_attn.k_proj"])  # same input
    quantize(model, "int4-sym-b32-o4", calibration=lambda: stats)
    kinds = {m.method.name for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"int4-sym-b32-o4", "int8-sym-channel"}  # the head: int8, uncalibrated
    x = torch.tensor([ids[:20]])
    with torch.no_grad():
        want = model(x)
    save_checkpoint(model, tmp_path / "q")
    loaded, _ = load_checkpoint(tmp_path / "q")
    fuse_projections(loaded)  # q/k/v share their outlier features: they fuse
    assert isinstance(loaded.layers[0].self_attn.qkv_proj, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)


def test_ste_gradients_and_conversion_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    fq = FakeQuantLinear(lin, get_method("int4-sym-b32"))
    wq = get_method("int4-sym-b32").roundtrip(lin.weight.detach())
    x = torch.randn(5, 64, requires_grad=True)
    gy = torch.randn(5, 32)
    y = fq(x)
    torch.testing.assert_close(y, x @ wq.t() + lin.bias)
    y.backward(gy)
    # straight through: dL/dW = gy^T x (as if W were used), dL/dx = gy Q(W)
    torch.testing.assert_close(lin.weight.grad, gy.t() @ x.detach())
    torch.testing.assert_close(x.grad, gy @ wq)
    torch.testing.assert_close(lin.bias.grad, gy.sum(0))
    # a model: fake-quantized forward == the converted QuantLinear model's forward
    model = tiny_llama().eval()
    prepare_qat(model, "int3-asym-b32")
    assert isinstance(model.layers[0].mlp.up_proj, FakeQuantLinear)
    ids = torch.randint(0, 260, (1, 16))
    with torch.no_grad():
        want = model(ids)
        convert_qat(model)
        assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
        assert model.layers[0].mlp.up_proj.method.name == "int3-asym-b32"
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(LLMKitError, match="calibrated"):
        prepare_qat(tiny_llama(), "int4-sym-b32-o4")


def test_finetune_qat_writes_quantized_checkpoint(tmp_path):
    from llmkit.config import load_config
    from llmkit.recipes.finetune import FinetuneConfig, finetune

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: to be or not to be, that is the question."}) + "\n"
                            for i in range(20)))
    cfg = load_config(FinetuneConfig, None, ["model=tiny", "method=full", "qat=int4-sym-b32", f"train.out_dir={tmp_path / 'out'}",
                                             f"data.files={data}", "train.steps=3", "train.batch_size=2",
                                             "data.seq_len=64", "train.progress=false", "optim.lr=1e-3"])
    s = finetune(cfg, model=tiny_llama(), tokenizer=byte_chat_tokenizer(), quiet=True)
    assert s["val_loss_after"] < s["val_loss_before"]
    info = json.loads((tmp_path / "out" / "llmkit.json").read_text())
    assert info["quantization"]["layers"]["layers.0.mlp.up_proj"] == "int4-sym-b32"
    loaded, _ = load_checkpoint(tmp_path / "out")
    assert isinstance(loaded.layers[1].self_attn.q_proj, QuantLinear)
    bad = load_config(FinetuneConfig, None, ["method=lora", "qat=int4-sym-b32", "model=x",
                                             f"train.out_dir={tmp_path / 'o2'}", f"data.files={data}"])
    with pytest.raises(LLMKitError, match="qat=int4-sym-b32 needs method=full"):
        bad.validate()
    bad.method, bad.qat = "full", "int5-sym-b32"
    with pytest.raises(LLMKitError, match="bit width 5"):
        bad.validate()


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "m"
    save_checkpoint(tiny_llama(), d, byte_chat_tokenizer())
    return d


@pytest.mark.parametrize("argv, message", [
    (["--method", "int5-sym-b32"], "bit width 5 is not supported in 'int5-sym-b32' (supported: 2, 3, 4, 8)"),
    (["--method", "int4-sym", "--block-size", "48"], "block size 48 is not supported"),
    (["--method", "nf4", "--block-size", "32"], "NF4 block size 32 is not supported"),
    (["--method", "int4-sym-b32", "--block-size", "64"], "--block-size applies to"),
    (["--method", "int4-sym-b32-o8", "--calibration", "EMPTY"], "calibration file"),
])
def test_quantize_cli_bad_input(capsys, tmp_path, tiny_ckpt, argv, message):
    (tmp_path / "empty.txt").write_text("  \n")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    rc, _, err = run(capsys, "quantize", "--model", tiny_ckpt, "--out", tmp_path / "q", *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


def test_quantize_cli_outlier_and_no_overwrite(capsys, tmp_path, tiny_ckpt):
    (tmp_path / "calib.txt").write_text("Calibration text, not the held-out one. " * 20)
    args = ["quantize", "--model", tiny_ckpt, "--method", "int4-asym", "--block-size", "64", "--out", tmp_path / "q"]
    rc, _, err = run(capsys, *args)
    assert rc == 0, err
    assert json.loads((tmp_path / "q" / "llmkit.json").read_text())["quantization"]["method"] == "int4-asym-b64"
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "already exists" in err
    rc, _, err = run(capsys, "quantize", "--model", tiny_ckpt, "--method", "int4-sym-b32-o8", "--calibration",
                     tmp_path / "calib.txt", "--out", tmp_path / "q", "--force")
    assert rc == 0, err
    rc, _, err = run(capsys, "generate", "--model", tmp_path / "q", "--prompt", "Hi", "--max-new-tokens", "4")
    assert rc == 0, err
