"""PEFT methods as module swaps: LoRA against HF `peft`, adapters' zero-init identities, selective freezing."""

import json

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.models import ModelConfig, Transformer
from llmkit.peft import (apply_adapters, apply_llama_adapter, apply_lora, apply_prompt_tuning,
                         load_adapter, merge_lora, nearest_tokens, save_adapter, select_trainable, trainable_summary,
                         unload, unmerge_lora)
from llmkit.peft.lora import LoRALinear

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]


def tiny(seed=0, **over):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", **over)).eval()


def ids(seed=1, B=2, T=12, V=256):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(llmkit model, the same weights as a transformers LlamaForCausalLM)."""
    transformers = pytest.importorskip("transformers")
    from llmkit.checkpoint import save_hf_model

    d = tmp_path_factory.mktemp("hf_tiny")
    model = tiny()
    save_hf_model(model, d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return d, hf


def fresh_hf(d):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


# ---------------------------------------------------------------- LoRA vs peft
def test_lora_output_equals_peft(hf_pair):
    peft = pytest.importorskip("peft")
    d, _ = hf_pair
    ours = apply_lora(tiny(), targets=TARGETS, r=4, alpha=8.0)
    randomize_lora(ours)
    ref = peft.get_peft_model(fresh_hf(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           lora_dropout=0.0)).eval()
    own = dict(ours.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.model.", "").replace(".default", "")
                p.copy_(own[key])
                n += 1
    assert n == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    x = ids()
    with torch.no_grad():
        a, b = ours(x), ref(input_ids=x).logits
    assert (a - b).abs().max() < 1e-5
    # the adapter really changes the output (so the comparison can fail)
    with torch.no_grad():
        assert (a - fresh_hf(d)(input_ids=x).logits).abs().max() > 1e-3


def test_lora_adapter_files_round_trip_with_peft(hf_pair, tmp_path):
    peft = pytest.importorskip("peft")
    d, _ = hf_pair
    ours = apply_lora(tiny(), targets=["q_proj", "k_proj", "v_proj"], r=2, alpha=5.0)
    randomize_lora(ours, seed=7)
    save_adapter(ours, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2
    x = ids(2)
    ref = peft.PeftModel.from_pretrained(fresh_hf(d), tmp_path / "ad").eval()
    with torch.no_grad():
        assert (ours(x) - ref(input_ids=x).logits).abs().max() < 1e-5
    # and the other way: an adapter written by peft loads into llmkit
    ref2 = peft.get_peft_model(fresh_hf(d), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in ref2.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ref2.save_pretrained(tmp_path / "peft_ad")
    mine = load_adapter(tiny(), tmp_path / "peft_ad")
    with torch.no_grad():
        assert (mine(x) - ref2.eval()(input_ids=x).logits).abs().max() < 1e-5


def test_merge_equals_unmerged_and_unmerge_restores():
    base = tiny()
    w0 = base.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_lora(base, r=4, alpha=16.0)
    randomize_lora(model)
    x = ids()
    with torch.no_grad():
        y = model(x)
        merge_lora(model)
        assert (model(x) - y).abs().max() < 1e-5
        assert (model.layers[0].self_attn.q_proj.base_layer.weight - w0).abs().max() > 1e-4
        unmerge_lora(model)
        assert (model.layers[0].self_attn.q_proj.base_layer.weight - w0).abs().max() < 1e-6
        unload(model, merge=True)
        assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)
        assert (model(x) - y).abs().max() < 1e-5


def test_lora_b_zero_is_base_and_only_lora_trains():
    x = ids()
    with torch.no_grad():
        y0 = tiny()(x)
    model = apply_lora(tiny(), targets="all-linear", r=4)
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    s = trainable_summary(model)
    assert 0 < s["share"] < 0.5


def test_lora_bad_input(tmp_path):
    with pytest.raises(LLMKitError, match="rank"):
        apply_lora(tiny(), r=0)
    with pytest.raises(LLMKitError, match="q_projj.*do not exist|q_projj.*does not exist") as e:
        apply_lora(tiny(), targets=["q_projj"])
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    model = apply_lora(tiny(), r=2)
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(LLMKitError, match="exists"):
        save_adapter(model, tmp_path / "ad")
    other = tiny(d_model=32, n_head=2, n_kv_head=1)  # another base model: shapes differ
    with pytest.raises(LLMKitError, match="another base model"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(LLMKitError, match="not an adapter directory"):
        load_adapter(tiny(), tmp_path)


# ---------------------------------------------------------------- other methods
def test_llama_adapter_zero_gate_is_base_and_save_load(tmp_path):
    x = ids()
    with torch.no_grad():
        y0 = tiny()(x)
    model = apply_llama_adapter(tiny(), adapter_len=5, n_layers=1)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() < 1e-6
        model.layers[1].self_attn.adaption_gate.fill_(0.5)
        y1 = model(x)
    assert (y1 - y0).abs().max() > 1e-4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "layers.1.self_attn.adaption_prompt", "layers.1.self_attn.adaption_gate"}
    save_adapter(model, tmp_path / "la")
    again = load_adapter(tiny(), tmp_path / "la")
    with torch.no_grad():
        assert (again(x) - y1).abs().max() < 1e-6


def test_bottleneck_adapters_zero_init_is_base(tmp_path):
    x = ids()
    with torch.no_grad():
        y0 = tiny()(x)
    model = apply_adapters(tiny(), bottleneck=8)
    with torch.no_grad():
        assert (model(x) - y0).abs().max() < 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 and all(".adapter." in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
        y1 = model(x)
    save_adapter(model, tmp_path / "bn")
    with torch.no_grad():
        assert (load_adapter(tiny(), tmp_path / "bn")(x) - y1).abs().max() < 1e-6


def test_prompt_tuning_trains_only_the_prompt(tmp_path):
    model = apply_prompt_tuning(tiny(), n_tokens=4, init_ids=[5, 6, 7, 8])
    assert [t for _, t, _, _ in nearest_tokens(model)] == [5, 6, 7, 8]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    logits = model(x)
    assert logits.shape == (2, 12, 256)
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"prefix.weight"}
    # per-task prompts: save, swap in another, swap back
    save_adapter(model, tmp_path / "task_a")
    with torch.no_grad():
        ya = model(x)
        b = apply_prompt_tuning(tiny(), n_tokens=4)
        save_adapter(b, tmp_path / "task_b")
        m = load_adapter(tiny(), tmp_path / "task_b")
        yb = m(x)
        m = load_adapter(m, tmp_path / "task_a")
        assert (m(x) - ya).abs().max() < 1e-6
        assert (yb - ya).abs().max() > 1e-4


def explicit_prompt_logits(model, idx):
    """The reference: the base model (prefix slot emptied) on [P; E[idx]], prompt outputs dropped."""
    p = model.prefix
    model.prefix = None
    try:
        e = torch.cat([p.weight[None].expand(idx.size(0), -1, -1), model.embed_tokens(idx)], dim=1)
        return model(None, embeds=e)[:, p.weight.size(0):]
    finally:
        model.prefix = p


def greedy_reference(model, prompt, n_new):
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(explicit_prompt_logits(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-mistral"])
def test_soft_prompt_owned_by_the_model(preset):
    """The soft prompt is the model's prefix: generation (KV cache, batched, ragged, prefix cache,
    speculative), scoring and the eval harness (several trees in one packed row) all equal the base
    model run on [P; E[idx]] with the prompt prepended by hand, and callers never test for it."""
    from llmkit.eval.harness import continuation_logprobs
    from llmkit.inference import PrefixCache, SamplingParams, generate, generate_batch, speculative_generate
    from llmkit.inference.generate import truncated_draft
    from llmkit.scoring import gather_logprobs, token_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, max_seq_len=64)).eval()
    base = Transformer(ModelConfig.from_preset(preset, max_seq_len=64)).eval()
    base.load_state_dict(model.state_dict())
    apply_prompt_tuning(model, n_tokens=5)
    with torch.no_grad():
        model.prefix.weight.mul_(30)  # a prompt far from any token, so it visibly matters
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [10, 11, 12]]  # past the window of 16
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    with torch.no_grad():
        refs = [greedy_reference(model, p, 8) for p in prompts]
        x = torch.tensor(prompts[0])
        assert (explicit_prompt_logits(model, x[None]) - base(x[None])).abs().max() > 1e-3  # the prompt matters
        assert (model(x[None]) - explicit_prompt_logits(model, x[None])).abs().max() < 1e-5
    for c, ref in zip(generate_batch(model, prompts, greedy), refs):  # cached, batched, ragged
        assert c.tokens == ref
    assert generate(model, prompts[0], greedy).tokens == refs[0]  # tiny-mistral: the rolling buffer
    pc = PrefixCache()
    for _ in range(2):  # the second call reuses the stored prompt K/V
        assert generate(model, prompts[0], greedy, prefix_cache=pc).tokens == refs[0]
    assert pc.hits == 1
    sp = speculative_generate(model, truncated_draft(model, 1), prompts[0], greedy, k=3)
    assert sp.tokens == refs[0]
    with torch.no_grad():
        lp_ref = gather_logprobs(explicit_prompt_logits(model, x[None])[0, :-1], x[1:])
    assert (token_logprobs(model, x) - lp_ref).abs().max() < 1e-5
    pairs = [([3, 4], [5, 6]), ([3, 4], [7]), ([9, 8, 7], [1, 2, 3])]
    got = continuation_logprobs(model, pairs)  # one packed row: two trees, each sees the prompt
    for (ctx, cont), lp in zip(pairs, got):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            ref = gather_logprobs(explicit_prompt_logits(model, seq)[0, len(ctx) - 1:-1], seq[0, len(ctx):])
        assert abs(lp - float(ref.sum())) < 1e-4


def test_soft_prompt_takes_positions_of_the_context_window():
    model = apply_prompt_tuning(tiny(max_seq_len=32), n_tokens=4)
    assert model.max_tokens == 28
    with torch.no_grad():
        model(ids(T=28))
        with pytest.raises(LLMKitError, match="less its 4-token prefix"):
            model(ids(T=29))


def test_selective_freezing():
    m = select_trainable(tiny(), top_n_layers=1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("layers.1.") for n in names)
    m = select_trainable(tiny(), attention_only=True)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(".self_attn." in n for n in names) and any(n.startswith("layers.0.") for n in names)
    m = select_trainable(tiny(), modules=["norm"])
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"norm.weight"}
    with pytest.raises(LLMKitError, match="matches no parameter"):
        select_trainable(tiny(), modules=["attention"])
    with pytest.raises(LLMKitError, match="top_n_layers"):
        select_trainable(tiny(), top_n_layers=5)


@pytest.mark.parametrize("method", ["llama-adapter", "prompt"])
def test_llama_adapter_and_prompt_files_load_in_peft(hf_pair, tmp_path, method):
    """Our LLaMA-Adapter computes what peft's AdaptionPrompt does, and both adapter files load in peft."""
    peft = pytest.importorskip("peft")
    d, _ = hf_pair
    model = tiny()
    if method == "llama-adapter":
        apply_llama_adapter(model, adapter_len=5, n_layers=1)
        with torch.no_grad():
            model.layers[1].self_attn.adaption_gate.fill_(0.7)
    else:
        apply_prompt_tuning(model, n_tokens=3)
    save_adapter(model, tmp_path / "ad")
    ref = peft.PeftModel.from_pretrained(fresh_hf(d), tmp_path / "ad").eval()
    x = ids()
    with torch.no_grad():
        theirs = ref(input_ids=x).logits
        ours = model(x) if method == "llama-adapter" else model(x)
        assert (ours - theirs[:, -x.size(1):]).abs().max() < 1e-5
        assert (ours - tiny()(x)).abs().max() > 1e-4
