"""GGUF export (llmkit.checkpoint.gguf_export, `llmkit export`): f32 round trip exact, quantized tensors
equal to the `gguf` package's dequantization of what was written, llama.cpp (llama-cpp-python) tokenizing
and generating as llmkit does, the ollama Modelfile, and bad input."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmkit.checkpoint import load_gguf, save_checkpoint  # noqa: E402
from llmkit.checkpoint.gguf_export import permute_qk, save_gguf, save_ollama  # noqa: E402
from llmkit.checkpoint.ollama import modelfile, render_go_template, role_wrappers  # noqa: E402
from llmkit.cli import main  # noqa: E402
from llmkit.errors import LLMKitError  # noqa: E402
from llmkit.gguf_io import open_gguf  # noqa: E402
from llmkit.models import ModelConfig, Transformer  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:  Speak, speak! 1234 don't\tWe're\n"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE trained here (as the speedrun's): <|endoftext|>, ChatML specials, merges."""
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text((REPO / "llmkit/data/tinyshakespeare.txt").read_text()[:60000])
    return Tokenizer.train([corpus], vocab_size=320)


def tiny(preset: str, **kw) -> Transformer:
    torch.manual_seed(0)
    # vocab 336 > the tokenizer's 320: the padded ids are written as "[PADi]" (UNUSED), as llama.cpp's converter does
    return Transformer(ModelConfig.from_preset(preset, vocab_size=336, d_ff=128, **kw)).eval()


def raw_tensors(path) -> dict:
    return {t.name: t for t in open_gguf(path).tensors}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-mixtral"])
def test_f32_round_trip_exact(tmp_path, tok, preset):
    model = tiny(preset)
    out = tmp_path / "m.gguf"
    save_gguf(model, tok, out, "f32")
    back, meta = load_gguf(out)
    assert meta["general.architecture"] == {"tiny-qwen2": "qwen2", "tiny-gpt2": "gpt2"}.get(preset, "llama")
    # llama.cpp runs Mistral/Mixtral as "llama": they come back as llama (Mixtral's experts kept), the
    # context capped at Mistral's sliding window
    assert back.cfg.family == {"tiny-mistral": "llama", "tiny-mixtral": "mixtral"}.get(preset, model.cfg.family)
    assert back.cfg.max_seq_len == min(model.cfg.max_seq_len, model.cfg.sliding_window or model.cfg.max_seq_len)
    for k in ("norm", "mlp", "activation", "pos_emb", "bias", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
              "head_dim", "vocab_size", "rope_theta", "tie_embeddings", "qkv_bias", "n_expert", "n_expert_per_tok"):
        assert getattr(back.cfg, k) == getattr(model.cfg, k), k
    assert back.cfg.norm_eps == pytest.approx(model.cfg.norm_eps)  # stored as float32
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.tensor([tok.encode(TEXT)[: back.cfg.max_seq_len]])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))
    tok2 = Tokenizer.from_gguf(out)  # the tokenizer read back: same ids, specials, template
    assert tok2.encode(TEXT) == tok.encode(TEXT)
    assert (tok2.eos_token, tok2.bos_token, tok2.add_bos, tok2.chat_template) == \
        (tok.eos_token, tok.bos_token, tok.add_bos, tok.chat_template)
    assert tok2.encode("<|im_start|>user")[0] == tok.token_to_id("<|im_start|>")


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "bf16", "f16"])
def test_quantized_tensors_equal_gguf_dequantization(tmp_path, tok, qtype):
    """What we write is gguf-py's quantization of the (rope-permuted) weights, and what llmkit reads back
    is gguf-py's dequantization of it; 1-D tensors stay F32."""
    model = tiny("tiny-llama")
    out = tmp_path / "m.gguf"
    written = save_gguf(model, tok, out, qtype)
    raw = raw_tensors(out)
    back, _ = load_gguf(out)
    sd, sd2 = model.state_dict(), back.state_dict()
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    checked = 0
    for name, t in raw.items():
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == kind and written[name] == kind.name, name
        ours = {"token_embd.weight": "embed_tokens.weight", "output.weight": "lm_head.weight"}.get(name)
        if ours is None:
            _, i, mod, _ = name.split(".")
            ours = f"layers.{i}." + {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                                     "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                                     "ffn_down": "mlp.down_proj"}[mod] + ".weight"
        w = sd[ours].numpy()
        if "attn_q" in name or "attn_k" in name:
            w = permute_qk(sd[ours], model.cfg.n_head if "attn_q" in name else model.cfg.n_kv_head).numpy()
        want_bytes = gguf.quants.quantize(w, kind)
        got_bytes = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(got_bytes, want_bytes.view(np.uint8).reshape(-1)), name
        deq = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, kind), dtype=np.float32).reshape(w.shape))
        if "attn_q" in name or "attn_k" in name:  # what llmkit holds: llama.cpp's row order undone
            n = model.cfg.n_head if "attn_q" in name else model.cfg.n_kv_head
            deq = deq.reshape(n, deq.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
        assert torch.equal(sd2[ours], deq), name
        err = (sd2[ours] - sd[ours]).abs().max().item()
        assert 0 < err < 0.1 * sd[ours].abs().max().item(), name  # really quantized, and close
        checked += 1
    assert checked == 2 + 7 * model.cfg.n_layer


def test_int4_checkpoint_to_q4_1_keeps_codes(tmp_path, tok):
    """llmkit's int4 is Q4_1's layout: exporting it as q4_1 gives back the same 4-bit codes."""
    from llmkit.quant import quantize
    from llmkit.quant.methods import _int4_codes

    model = quantize(tiny("tiny-llama"), "int4")
    out = tmp_path / "m.gguf"
    save_gguf(model, tok, out, "q4_1")
    t = raw_tensors(out)["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    blocks = np.asarray(t.data).view(np.uint8).reshape(-1, 20)[:, 4:]  # d f16, m f16, 16 bytes of nibbles
    codes = np.concatenate([blocks & 15, blocks >> 4], axis=1)  # element j low nibble, j + 16 high
    ours = _int4_codes(model.layers[0].mlp.up_proj.storage()["qweight"]).numpy()
    assert np.array_equal(codes.reshape(ours.shape), ours)



def _llama(path, **kw):
    pytest.importorskip("llama_cpp")
    from llmkit.llamacpp import load_llama

    return load_llama(path, 1, 256, **kw)


def _cpp_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


# log-prob tolerance (nats) of llama.cpp vs llmkit reading the same file: llama.cpp quantizes the
# activations to 8 bits for quantized matmuls (measured on these tiny models: f32 9e-5, q8_0 4e-3, q4 5e-3)
TOL = {"f32": 1e-3, "f16": 2e-3, "q8_0": 3e-2, "q4_1": 3e-2}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_llama_cpp_runs_the_export(tmp_path, tok, preset):
    from llmkit.inference import generate
    from llmkit.inference.sampling import SamplingParams

    model = tiny(preset)
    ids = tok.encode(TEXT)
    for qtype, tol in TOL.items():
        out = tmp_path / f"{qtype}.gguf"
        save_gguf(model, tok, out, qtype)
        back, _ = load_gguf(out)
        llm = _llama(out, logits_all=True)
        try:
            assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
            assert llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True)[0] == \
                tok.token_to_id("<|im_start|>")
            llm.eval(ids)
            theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[:len(ids)])), -1)
            with torch.no_grad():
                mine = torch.log_softmax(back(torch.tensor([ids]))[0], -1)
            assert (theirs - mine).abs().max().item() < tol, qtype
            if qtype in ("f32", "f16"):  # random tiny models have near ties: greedy compared where exact-ish
                want = generate(back, ids[:8], SamplingParams(temperature=0, max_new_tokens=16)).tokens
                assert _cpp_greedy(llm, ids[:8], 16) == want, qtype
        finally:
            llm.close()


# ------------------------------------------------------------------ ollama
def test_modelfile_chatml(tok):
    cfg = ModelConfig.from_preset("tiny-llama")
    text = modelfile("model.gguf", tok, cfg, temperature=0.0)
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER temperature 0" in lines and f"PARAMETER num_ctx {cfg.max_seq_len}" in lines
    tmpl = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert tmpl == ('{{- range $i, $_ := .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}'
                    '<|im_end|>\n{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
                    '{{ if eq (len (slice $.Messages $i)) 1 }}{{ if ne .Role "assistant" }}<|im_start|>assistant\n'
                    '{{ end }}{{ end }}{{ end }}')


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                   "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                   " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("template", [None, LLAMA3_TEMPLATE])
def test_go_template_renders_as_the_chat_template(tok, template):
    """The derived wrappers reproduce the Jinja rendering of a multi-turn conversation (the Go template
    is these wrappers in if/else branches; ollama itself is not installable here)."""
    t = Tokenizer(tok.hf, bos_token=tok.bos_token, eos_token=tok.eos_token, add_bos=template is not None,
                  chat_template=template)
    w = role_wrappers(t)
    want = t.apply_chat_template(MESSAGES, add_generation_prompt=True)
    if t.add_bos:  # llama.cpp / ollama prepend bos themselves
        want = want.removeprefix(t.bos_token)
    assert render_go_template(w, MESSAGES) == want
    assert render_go_template(w, MESSAGES[:3]) == want[:len(render_go_template(w, MESSAGES[:3]))]


def test_go_template_refuses_reordering_templates(tok):
    t = Tokenizer(tok.hf, eos_token=tok.eos_token, chat_template="{% for m in messages|reverse %}{{ m['content'] }}"
                  "{% endfor %}")
    with pytest.raises(LLMKitError, match="ollama TEMPLATE"):
        role_wrappers(t)


# ------------------------------------------------------------------ CLI and bad input
@pytest.fixture
def ckpt(tmp_path, tok):
    d = tmp_path / "ckpt"
    save_checkpoint(tiny("tiny-llama"), d, tokenizer=tok)
    return d


def test_cli_gguf_and_ollama(tmp_path, ckpt, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--type", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().err
    _, meta = load_gguf(out)
    assert meta["general.name"] == str(ckpt)
    od = tmp_path / "ollama"
    assert main(["export", "--format", "ollama", "--model", str(ckpt), "--out", str(od)]) == 0
    assert sorted(p.name for p in od.iterdir()) == ["Modelfile", "model.gguf"]
    assert "FROM ./model.gguf" in (od / "Modelfile").read_text()
    load_gguf(od / "model.gguf")
    hd = tmp_path / "hf"
    assert main(["export", "--format", "hf", "--model", str(ckpt), "--out", str(hd)]) == 0
    assert (hd / "config.json").is_file() and (hd / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, msg", [
    (["--type", "q4_k"], "unknown GGUF type 'q4_k'"),
    (["--format", "ggml"], "unknown export format 'ggml'"),
    (["--format", "hf", "--type", "q8_0"], "--type applies to"),
])
def test_cli_bad_values(tmp_path, ckpt, capsys, argv, msg):
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "x.gguf"), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_overwrite_and_writes_atomically(tmp_path, ckpt, tok, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    from llmkit.checkpoint import gguf_export

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf_export, "encode_tensor", boom)
    with pytest.raises(RuntimeError):
        save_gguf(tiny("tiny-llama"), tok, out, "f16", force=True)
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]
    monkeypatch.undo()
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--force"]) == 0
    load_gguf(out)


@pytest.mark.parametrize("preset, kw, msg", [
    ("tiny-gpt2", {"activation": "gelu"}, ("llama.cpp's 'gpt2' architecture does not run activation='gelu' "
                                            "(supported families: llama, mistral, mixtral, qwen2, gpt2)")),
    ("tiny-llama", {"causal": False}, "does not run causal=False"),
    ("tiny-llama", {"family": "phi3"}, "cannot export family 'phi3' to GGUF (llama.cpp architectures written: "),
    ("tiny-llama", {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "rope scaling 'llama3'"),
])
def test_unsupported_architectures(tmp_path, tok, preset, kw, msg):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=336, **kw))
    with pytest.raises(LLMKitError) as e:
        save_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LLMKitError):
        save_ollama(model, tok, tmp_path / "o", "f16")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the real speedrun model (slow)
SPEEDRUN = Path(os.environ.get("LLMKIT_SPEEDRUN", "/work/models/speedrun/pretrain/final"))
PROMPTS = ["ROMEO:", "First Citizen:\nWe are accounted poor", "KING RICHARD III:\nNow is the", "To be, or not"]


@pytest.mark.skipif(not os.environ.get("LLMKIT_SLOW"), reason="slow: set LLMKIT_SLOW=1")
@pytest.mark.skipif(not (SPEEDRUN / "llmkit.json").is_file(), reason="no speedrun checkpoint")
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_speedrun_export_same_greedy_tokens(tmp_path, qtype):
    from llmkit.inference import generate
    from llmkit.inference.sampling import SamplingParams
    from llmkit.loading import load_model

    model, t = load_model(str(SPEEDRUN))
    out = tmp_path / "s.gguf"
    save_gguf(model, t, out, qtype)
    back, _ = load_gguf(out)
    llm = _llama(out, logits_all=True)  # scores row n_tokens - 1 is filled only with every row kept
    try:
        for p in PROMPTS:
            ids = t.encode(p)
            assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids
            want = generate(back, ids, SamplingParams(temperature=0, max_new_tokens=32)).tokens
            assert _cpp_greedy(llm, ids, 32) == want, p
    finally:
        llm.close()
