"""Model zoo parity with `transformers` (randomly initialised tiny models, fp32), both directions."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.checkpoint import load_hf_model, save_hf_model  # noqa: E402
from llmkit.errors import LLMKitError  # noqa: E402
from llmkit.models import PRESETS, ModelConfig, Transformer, num_params  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _hf_models():
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=500000.0)),
        "llama-mqa-untied": lambda: LlamaForCausalLM(LlamaConfig(**dict(COMMON, num_key_value_heads=1),
                                                                 tie_word_embeddings=False)),
        "llama-rope-linear": lambda: LlamaForCausalLM(LlamaConfig(
            **COMMON, rope_scaling={"rope_type": "linear", "factor": 4.0})),
        "llama-rope-llama3": lambda: LlamaForCausalLM(LlamaConfig(
            **COMMON, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
        "mistral-window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                            router_aux_loss_coef=0.02)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),
    }


FAMILIES = list(_hf_models())


def _randomize(model):
    # HF inits norms to 1 and biases to 0: randomise everything so no tensor mapping can hide
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_parity_both_directions(family, tmp_path):
    torch.manual_seed(0)
    hf = _randomize(_hf_models()[family]()).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (2, 24))  # 24 > the Mistral window of 8
    with torch.no_grad():
        ref = hf(ids).logits

    ours = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        got = ours(ids)
    diff = (got - ref).abs().max().item()
    print(f"{family}: HF -> llmkit max |dlogit| = {diff:.2e}")
    assert diff < TOL

    # llmkit -> HF format -> transformers
    save_hf_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(ids).logits
    diff2 = (again - ref).abs().max().item()
    print(f"{family}: llmkit -> HF max |dlogit| = {diff2:.2e}")
    assert diff2 < TOL


def test_mixtral_aux_loss_matches_hf(tmp_path):
    hf = _randomize(_hf_models()["mixtral"]()).eval()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        ours = load_hf_model(tmp_path)
        ours(ids)
    assert abs(ours.aux_loss().item() - out.aux_loss.item()) < 1e-5


def test_sharded_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("tiny-llama")
    m = Transformer(cfg).eval()
    save_hf_model(m, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m2 = load_hf_model(tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("tiny-")])
def test_kv_cache_matches_full_forward(preset):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # past tiny-mistral's window of 16
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64)  # the attention's own layout (MLA caches its latent)
        steps = [m(ids[:, :20], torch.arange(20), cache)]
        steps += [m(ids[:, t:t + 1], torch.tensor([t]), cache) for t in range(20, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_param_counts_of_real_presets():
    # published sizes: SmolLM2-135M 134.5M, GPT-2 124.4M, Llama-3.2-1B 1.236B, Mistral-7B 7.24B,
    # Mixtral-8x7B 46.7B (12.9B active), Qwen2.5-0.5B 494M
    expect = {"smollm2-135m": 134_515_008, "gpt2-124m": 124_439_808, "llama-3.2-1b": 1_235_814_400,
              "mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704, "qwen2.5-0.5b": 494_032_768}
    for name, n in expect.items():
        cfg = ModelConfig.from_preset(name)
        assert num_params(cfg) == n
        with torch.device("meta"):
            assert sum(p.numel() for p in Transformer(cfg).parameters()) == n
    assert abs(num_params(ModelConfig.from_preset("mixtral-8x7b"), active=True) / 1e9 - 12.88) < 0.01


def test_bad_configs(tmp_path):
    with pytest.raises(LLMKitError, match="n_layre"):
        ModelConfig.from_dict({"n_layre": 2})
    with pytest.raises(LLMKitError, match="unknown model preset"):
        ModelConfig.from_preset("tiny-llamma")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(LLMKitError, match="missing field 'num_hidden_layers'"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LLMKitError, match="unsupported model_type 'bert'"):
        load_hf_model(tmp_path)


def test_context_window_error():
    m = Transformer(ModelConfig.from_preset("tiny-llama", max_seq_len=16))
    with pytest.raises(LLMKitError, match="context window of 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_preset("tiny-llama"))
    drop = Transformer(ModelConfig.from_preset("tiny-llama", dropout=0.2))
    drop.load_state_dict(plain.state_dict())  # dropout adds no weights
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(drop.eval()(x), plain.eval()(x))
        assert not torch.allclose(drop.train()(x), plain(x))
    with pytest.raises(LLMKitError, match="dropout"):
        ModelConfig.from_preset("tiny-llama", dropout=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_matches_inverted_dropout(dtype):
    """llmkit's CPU dropout (four 16-bit mask lanes per 64-bit random) behaves like nn.Dropout: each
    element is kept with probability 1-p, independently, and scaled by 1/(1-p); the gradient is the
    same mask times the scale; eval mode is the identity."""
    from llmkit.models.modules import Dropout

    torch.manual_seed(0)
    p, n = 0.1, 1_000_003  # odd size: the last 64-bit draw is only partly used
    d = Dropout(p)
    assert abs(d.scale - 1 / (1 - p)) < 1e-4
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = d(x)
    keep = (y != 0).float()
    # binomial std of the kept fraction at n=1e6 is 3e-4: 5 sigma
    assert abs(keep.mean().item() - (1 - p)) < 1.5e-3
    for lane in range(4):  # no 16-bit lane of the 64-bit draws is biased
        assert abs(keep[: n - n % 4].view(-1, 4)[:, lane].mean().item() - (1 - p)) < 3e-3
    lag1 = torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1].item()
    assert abs(lag1) < 5e-3  # neighbouring elements are independent
    assert torch.allclose(y[y != 0].float(), torch.tensor(d.scale), rtol=1e-2)
    assert abs(y.float().mean().item() - 1.0) < 2e-3  # unbiased: E[y] = x
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, y != 0)
    assert torch.allclose(x.grad[x.grad != 0].float(), torch.tensor(d.scale), rtol=1e-2)
    assert not torch.equal(d(x), y)  # a fresh mask every call
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_training_forward_traces_as_one_graph():
    """torch.compile sees the training forward as one graph: the context-window check must not read a
    tensor (.item() breaks the graph, and each break costs a recompile and a slower step)."""
    torch._dynamo.reset()
    m = Transformer(ModelConfig.from_preset("tiny-llama", dropout=0.1)).train()
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # dynamo only: fullgraph raises on a break
    x = torch.randint(0, 256, (2, 16))
    assert compiled(x).shape == (2, 16, 256)
    with pytest.raises(Exception, match="context window"):
        compiled(torch.zeros(1, 300, dtype=torch.long))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_index_cannot_point_outside_the_model_folder(tmp_path, name):
    from safetensors.torch import save_file

    from llmkit.checkpoint.hf import read_hf_weights

    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(LLMKitError, match="names a weight file outside its folder"):
        read_hf_weights(d)
