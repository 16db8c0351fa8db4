"""GGUF reading: synthetic files of every supported tensor type vs transformers, bad files, and
the real SmolLM2-135M-Instruct Q4_1 file vs transformers reading the same file."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from llmkit.checkpoint import load_gguf  # noqa: E402
from llmkit.errors import LLMKitError  # noqa: E402
from llmkit.scoring import gather_logprobs, token_logprobs  # noqa: E402

N_HEAD, N_KV, D, FF, V, L = 4, 2, 256, 512, 64, 2


def _permute(w, n_head):  # what llama.cpp's converter does to attn_q / attn_k
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_kquant(shape, qtype, rng):
    """Random but valid K-quant blocks (gguf-py cannot quantise K types): sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = (rng.random((rows, cols // block, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:4] = scales.reshape(rows, cols // block, 4)
    else:  # Q6_K: d last
        raw[..., -2:] = scales[..., :2].reshape(rows, cols // block, 2)[..., :2]
    return raw.reshape(rows, -1)


def write_gguf(path, hf_model, qtype):
    cfg = hf_model.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(V)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    written = {}
    for k, t in hf_model.state_dict().items():
        if k in names:
            name = names[k]
        else:
            i, mod = k.split(".")[2], ".".join(k.split(".")[3:-1])
            name = f"blk.{i}.{per_layer[mod]}.weight"
        a = t.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            a = _permute(a, N_HEAD)
        elif name.endswith("attn_k.weight"):
            a = _permute(a, N_KV)
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            raw = _random_kquant(a.shape, qtype, rng)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        written[name] = True
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_synthetic_gguf_matches_transformers(qtype, hf_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama, qtype)
    ours, meta = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
        if qtype == Q.F32:  # lossless: also equal to the original HF model
            assert (ours(ids) - hf_llama(ids).logits).abs().max() < 1e-4
    print(f"GGUF {qtype.name}: max |dlogit| vs transformers = {diff:.2e}")
    assert diff < 1e-4


def test_bad_gguf_files(hf_llama, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_llama, Q.Q8_0)
    data = path.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMKitError, match="trunc.gguf"):
        load_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(LLMKitError, match="corrupt or truncated"):
        load_gguf(tmp_path / "junk.gguf")
    (tmp_path / "notgguf.gguf").write_bytes(b"hello world")
    with pytest.raises(LLMKitError, match="not a GGUF file"):
        load_gguf(tmp_path / "notgguf.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LLMKitError, match="unsupported GGUF architecture 'bert'"):
        load_gguf(tmp_path / "bert.gguf")
    # an unsupported tensor type is named
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for k, v in dict(block_count=1, context_length=8, embedding_length=256, feed_forward_length=256,
                     **{"attention.head_count": 4, "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": 4}).items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 144), dtype=np.uint8), raw_dtype=Q.IQ4_NL)  # 256 values a row
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LLMKitError, match="unsupported type IQ4_NL"):
        load_gguf(tmp_path / "iq.gguf")


PARAGRAPHS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mostly in the leaves, inside the chloroplasts.",
]


def test_smollm2_logprobs_match_transformers(smollm2_gguf, hf_smollm2):
    model, _ = load_gguf(smollm2_gguf)  # straight from the file, not the converted cache
    ref_model, ref_tok = hf_smollm2
    worst = 0.0
    for text in PARAGRAPHS:
        ids = ref_tok(text)["input_ids"]
        ours = token_logprobs(model, ids)
        with torch.no_grad():
            ref = gather_logprobs(ref_model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]))
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"SmolLM2 Q4_1: max |dlogprob| vs transformers = {worst:.2e}")
    assert worst < 1e-3
