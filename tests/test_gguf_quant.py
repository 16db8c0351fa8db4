"""Quantized GGUF loading (`load_gguf(quantized=True)`, load_model's default for a GGUF): the 4-bit
blocks go into int4 QuantLinears code for code, Q8_0 into int8, Q6_K into bf16, the token table into
a QuantEmbedding (tied to the head when the file has no output.weight); logits and greedy tokens
against the dequantised fp32 path and transformers reading the same file."""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from test_gguf import D, FF, L, N_HEAD, N_KV, V, Q, write_gguf  # noqa: E402

from llmkit.checkpoint import load_checkpoint, load_gguf, save_checkpoint  # noqa: E402
from llmkit.inference import SamplingParams, generate  # noqa: E402
from llmkit.quant import QuantEmbedding, QuantLinear  # noqa: E402

# the method each GGUF type lands in (linears, then the token table)
EXPECTED = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4", Q.Q8_0: "int8", Q.Q6_K: "bf16"}


def _llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


class _NoOutput:
    """A tied HF model as write_gguf sees it: no lm_head.weight, so the file has no output.weight and
    its token_embd serves as the head (as in SmolLM2's GGUF)."""

    def __init__(self, m):
        self.config, self.m = m.config, m

    def state_dict(self):
        return {k: v for k, v in self.m.state_dict().items() if k != "lm_head.weight"}


@pytest.fixture(scope="module")
def hf_llama():
    return _llama(False)


def _methods(model) -> dict[str, str]:
    return {n: m.method.name for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}


@pytest.mark.parametrize("qtype", list(EXPECTED), ids=lambda q: q.name)
def test_quantized_weights_are_the_files(qtype, hf_llama, tmp_path):
    """Every quantized module dequantizes to the file's weights: int4 up to the bf16 rounding of its
    (s, z) pairs, bf16 to 2^-9, the int8 re-rounding of Q8_0 to half an int8 step of the row."""
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama, qtype)
    dense, _ = load_gguf(path)
    qm, _ = load_gguf(path, quantized=True)
    methods = _methods(qm)
    assert isinstance(qm.embed_tokens, QuantEmbedding) and methods["embed_tokens"] == "int8"
    assert qm.embed_tokens.head is None
    lin = {n: m for n, m in methods.items() if n.startswith("layers.")}
    assert len(lin) == 7 * L and set(lin.values()) == {EXPECTED[qtype]}
    ref = dict(dense.named_modules())
    for name, m in qm.named_modules():
        if not isinstance(m, QuantLinear | QuantEmbedding):
            continue
        w = m.dequantize() if isinstance(m, QuantLinear) else m.weight
        r = ref[name].weight
        step = r.abs().amax(1, keepdim=True) / 127  # an int8 step of each row
        if m.method.name == "int8":
            bound = step * 0.51 + r.abs() * 2**-8
        elif m.method.name == "int4":  # |q - 8| <= 8: (q - 8) s + z with s, z each off by 2^-9 relative
            bound = r.abs().amax(1, keepdim=True) * 2**-6
        else:
            bound = r.abs() * 2**-8
        assert ((w - r).abs() <= bound + 1e-7).all(), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantized_logits_and_greedy_tokens(qtype, hf_llama, tmp_path):
    """Realistic weights (an HF init quantized by gguf-py): logits within the quantization's tolerance
    of the dequantised path and of transformers on the same file; the same greedy tokens."""
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama, qtype)
    dense, _ = load_gguf(path)
    qm, _ = load_gguf(path, quantized=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        a, b, c = dense(ids), qm(ids), ref(ids).logits
        one = qm(ids[:, :1])  # one row: the int4/int8 kernels on bf16 activations
    scale = a.abs().max().item()
    print(f"GGUF {qtype.name} quantized: max |dlogit| vs fp32 path {(a - b).abs().max():.2e}, vs transformers "
          f"{(b - c).abs().max():.2e}, logit scale {scale:.2f}")
    assert (a - c).abs().max() < 1e-4
    assert (a - b).abs().max() < 0.03 * scale and (c - b).abs().max() < 0.03 * scale
    assert (one - a[:, :1]).abs().max() < 0.03 * scale
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompt = ids[0, :8].tolist()
    assert generate(qm, prompt, params).completions[0].tokens == generate(dense, prompt, params).completions[0].tokens


def test_tied_table_and_checkpoint_roundtrip(tmp_path):
    """A Q8_0 file without output.weight (SmolLM2's layout): the head is an int8 QuantLinear and the
    embedding gathers rows of the same table; save_checkpoint (the converted-GGUF cache's format)
    and back keeps the tie, the table stored once, and the same logits; close to the fp32 path."""
    path = tmp_path / "m.gguf"
    write_gguf(path, _NoOutput(_llama(True)), Q.Q8_0)
    dense, _ = load_gguf(path)
    qm, _ = load_gguf(path, quantized=True)
    assert qm.cfg.tie_embeddings and qm.embed_tokens.head is qm.lm_head
    assert _methods(qm)["lm_head"] == "int8" and not list(qm.embed_tokens.buffers())
    save_checkpoint(qm, tmp_path / "ck")
    back, _ = load_checkpoint(tmp_path / "ck")
    assert _methods(back) == _methods(qm) and back.embed_tokens.head is back.lm_head
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(ids), qm(ids))
        a, b = dense(ids), qm(ids)
    assert (a - b).abs().max() < 0.03 * a.abs().max()


def test_load_model_default_is_quantized(hf_llama, tmp_path):
    """load_model's default keeps a GGUF quantized; an explicit float32 gives the dequantised model."""
    from llmkit.loading import load_model

    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama, Q.Q4_0)
    qm, _ = load_model(str(path), with_tokenizer=False)
    assert _methods(qm)["layers.0.self_attn.q_proj"] == "int4"
    fp, _ = load_model(str(path), with_tokenizer=False, dtype=torch.float32)
    assert not _methods(fp) and fp.embed_tokens.weight.dtype == torch.float32


def test_smollm2_quantized_greedy_tokens(smollm2_gguf):
    """The real Q4_1 file: greedy tokens of the quantized load vs the dequantised fp32 one."""
    from llmkit.loading import load_tokenizer

    qm, meta = load_gguf(smollm2_gguf, quantized=True)
    assert _methods(qm)["layers.0.mlp.down_proj"] == "int4" and qm.embed_tokens.head is qm.lm_head
    dense, _ = load_gguf(smollm2_gguf)
    tok = load_tokenizer("gguf", smollm2_gguf, meta)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    a = generate(dense, ids, params).completions[0].tokens
    b = generate(qm, ids, params).completions[0].tokens
    print("fp32:", tok.decode(a), "| quantized:", tok.decode(b))
    assert a == b
