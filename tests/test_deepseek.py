"""DeepSeek family: MLA, DeepSeekMoE, multi-token prediction. Parity with transformers' DeepseekV3ForCausalLM
on tiny random configs, latent-cache decoding against full forwards, the absorbed decode path against the
naive one, KV-cache bytes against the allocated tensors, aux-loss-free balancing, MTP loss and drafting."""

import pytest
import torch

from llmkit.inference import SamplingParams, generate, mtp_generate
from llmkit.models import ModelConfig, Transformer, kv_bytes_per_token, num_params
from llmkit.models.modules import MLA, Router
from llmkit.train.optim import build_adamw
from llmkit.train.loop import lm_loss, train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one torch thread

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
               num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
               kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
               max_position_embeddings=128, norm_topk_prob=True)


def _hf_deepseek(tmp_path, **over):
    """A random tiny DeepseekV3ForCausalLM saved to tmp_path/hf: every tensor (norms, the router's
    correction bias) randomised so no mapping can hide behind an init of ones or zeros."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**HF_TINY, **over})).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "norm_topk_prob": False}],
                         ids=["v3", "full-rank-q-no-groups"])
def test_hf_deepseek_v3_parity_both_directions(tmp_path, over):
    from llmkit.checkpoint import load_hf_model, save_hf_model
    from transformers import AutoModelForCausalLM

    hf = _hf_deepseek(tmp_path, **over)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_hf_model(tmp_path / "hf")
        assert ours.cfg.attention == "mla" and ours.cfg.mlp == "deepseek_moe" and ours.cfg.rope_interleave
        assert (ours(ids) - ref).abs().max() < 1e-4
        save_hf_model(ours, tmp_path / "out")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert (back(ids).logits - ref).abs().max() < 1e-4


def test_hf_greedy_generation_and_cached_decode_match(tmp_path):
    """llmkit's cached decoding (latent cache, absorbed path) gives transformers' greedy tokens, and each
    cached step equals the full forward."""
    from llmkit.checkpoint import load_hf_model

    hf = _hf_deepseek(tmp_path)
    ours = load_hf_model(tmp_path / "hf")
    prompt = [3, 17, 42, 5, 99, 8]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 6:].tolist()
    got = generate(ours, prompt, SamplingParams(max_new_tokens=12, temperature=0)).tokens
    assert got == ref


@pytest.mark.parametrize("absorb", [None, True, False])
def test_mla_cached_decode_equals_full_forward(absorb):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-deepseek")
    m = Transformer(cfg).eval()
    for layer in m.layers:
        layer.self_attn.absorb = absorb
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64)
        steps = [m(ids[:, :20], torch.arange(20), cache)]
        steps += [m(ids[:, t:t + 1], torch.tensor([t]), cache) for t in range(20, 36)]
        steps += [m(ids[:, 36:40], torch.arange(36, 40), cache)]  # a 4-token chunk (speculative verification)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    # the cache holds the latent and the rotary key, not per-head K/V
    assert cache.k.shape == (cfg.n_layer, 2, 1, 64, cfg.kv_lora_rank)
    assert cache.v.shape == (cfg.n_layer, 2, 1, 64, cfg.qk_rope_head_dim)


def test_absorbed_attention_equals_naive_per_row_positions():
    """The absorbed path (W_UK folded into the query, W_UV after the weighted sum) equals decompressing
    K/V, including ragged per-row positions in a batch cache."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-deepseek")
    attn = MLA(cfg, 0).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m = Transformer(cfg)
    x = torch.randn(2, 10, cfg.d_model)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    outs = {}
    for absorb in (True, False):
        attn.absorb = absorb
        cache = MLA.new_cache(cfg, 2, 16)
        with torch.no_grad():
            first = attn(x[:, :7], m.rope(pos[:, :7]), cache.mask(pos[:, :7]), cache, pos[:, :7])
            step_pos = torch.tensor([[7, 8, 9], [4, 5, 6]])  # row 1 rolls back to position 4
            last = attn(x[:, 7:], m.rope(step_pos), cache.mask(step_pos), cache, step_pos)
        outs[absorb] = torch.cat([first, last], 1)
    assert (outs[True] - outs[False]).abs().max() < 1e-5


def test_kv_bytes_per_token_table_matches_allocated_cache():
    """MHA / GQA / MLA at the same width: the config formula equals the bytes the cache allocates."""
    base = dict(vocab_size=256, n_layer=4, n_head=8, d_model=256, d_ff=512, max_seq_len=64)
    cfgs = {"mha": ModelConfig(**base), "gqa": ModelConfig(**base, n_kv_head=2),
            "mla": ModelConfig(**base, attention="mla", kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                               v_head_dim=32)}
    got = {}
    for name, cfg in cfgs.items():
        cache = Transformer(cfg).new_cache(1, 64, dtype=torch.bfloat16)
        allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
        got[name] = kv_bytes_per_token(cfg)
        assert allocated == got[name] * 64
    assert got == {"mha": 4 * 2 * 8 * 32 * 2, "gqa": 4 * 2 * 2 * 32 * 2, "mla": 4 * (64 + 16) * 2}
    assert kv_bytes_per_token(ModelConfig.from_preset("deepseek-v3")) == 61 * 576 * 2  # V3: ~70 KB per token


def test_num_params_matches_model_and_deepseek_v3():
    for depth in (0, 2):
        cfg = ModelConfig.from_preset("tiny-deepseek", mtp_depth=depth)
        assert num_params(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert abs(num_params(v3) / 1e9 - 671) < 1 and abs(num_params(v3, active=True) / 1e9 - 37.5) < 1


def test_router_matches_hf_topk_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hc = transformers.DeepseekV3Config(**{**HF_TINY, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                          "num_experts_per_tok": 3})
    ref = DeepseekV3TopkRouter(hc)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.e_score_correction_bias, std=0.3)
    ours = Router(ModelConfig(vocab_size=8, n_layer=1, n_head=4, d_model=64, d_ff=8, n_expert=16, n_expert_per_tok=3,
                              n_group=4, topk_group=2, router_scoring="sigmoid", routed_scaling=2.5))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(50, 64)
    logits, w, idx = ours(x)
    rl, rw, ridx = ref(x)
    order, rorder = idx.sort(-1), ridx.sort(-1)
    assert torch.equal(order.values, rorder.values)
    assert torch.allclose(w.gather(1, order.indices), rw.gather(1, rorder.indices), atol=1e-6)


def test_aux_loss_free_bias_balances_a_skewed_router():
    """V3's bias balancing (Wang et al. 2024): a router whose weights favour two experts ends up
    spreading tokens once its bias has been updated, with the weights untouched."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=4, d_model=32, d_ff=8, n_expert=8, n_expert_per_tok=2,
                      router_scoring="sigmoid", router_balance="bias", router_bias_rate=0.003)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(8, 32) * 0.1)
        r.weight[:2] += 0.05  # experts 0 and 1 win for most tokens
    x = torch.randn(2048, 32).abs()

    def imbalance():  # max load / mean load, in eval mode (no update)
        load = torch.bincount(r.eval()(x)[2].flatten(), minlength=8).float()
        r.train()
        return (load.max() / load.mean()).item()

    before, w0 = imbalance(), r.weight.clone()
    for _ in range(300):
        r(x[torch.randint(0, 2048, (256,))])
    after = imbalance()
    assert before > 3 and after < 1.3, (before, after)
    assert torch.equal(r.weight, w0) and r.e_score_correction_bias[:2].max() < r.e_score_correction_bias[2:].min()


def test_aux_loss_option_keeps_router_logits():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16))
    for balance, expect in (("aux_loss", True), ("bias", False)):
        m = Transformer(ModelConfig.from_preset("tiny-deepseek", router_balance=balance))
        m(ids)
        assert (m.aux_loss().item() > 0) == expect


def test_mtp_loss_is_causal_and_trains():
    """MTP depth k at position i sees tokens <= i+k only (its logits ignore later tokens), and a few
    steps of lm_loss with mtp_coef lower both the next-token and the MTP loss."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-deepseek", mtp_depth=2, n_expert=0, mlp="swiglu", first_k_dense_replace=0)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 256  # change tokens 8..11
    with torch.no_grad():
        outs = []
        for x in (ids, ids2):
            h = m(x, return_hidden=True)
            h1, l1 = m.mtp_forward(0, h[:, :11], x[:, 1:], torch.arange(11))
            _, l2 = m.mtp_forward(1, h1[:, :10], x[:, 2:], torch.arange(10))
            outs.append((l1, l2))
    (a1, a2), (b1, b2) = outs
    assert torch.allclose(a1[:, :7], b1[:, :7], atol=1e-6) and not torch.allclose(a1[:, 7], b1[:, 7])
    assert torch.allclose(a2[:, :6], b2[:, :6], atol=1e-6) and not torch.allclose(a2[:, 6], b2[:, 6])

    m.train()
    text = torch.tensor(list(b"abcdefghij" * 6))
    batch = {"idx": text[None, :-1], "targets": text[None, 1:]}
    opt = build_adamw(m, 1e-2, weight_decay=0.0)
    first = train_step(m, opt, [batch], loss_fn=lambda mm, b: lm_loss(mm, b, mtp_coef=0.3))
    for _ in range(30):
        last = train_step(m, opt, [batch], loss_fn=lambda mm, b: lm_loss(mm, b, mtp_coef=0.3))
    assert last["mtp_loss"] < first["mtp_loss"] / 3 and last["ce"] < first["ce"] / 3


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_self_speculative_equals_greedy(depth):
    """Drafts from the MTP heads, verified by the model: the output is the greedy output token for
    token; after a short training on a cyclic text the drafts are mostly accepted."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-deepseek", mtp_depth=depth)
    m = Transformer(cfg)
    p = SamplingParams(max_new_tokens=24, temperature=0)
    prompt = list(b"the quick")
    untrained = mtp_generate(m.eval(), prompt, p)
    assert untrained.tokens == generate(m, prompt, p).tokens
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 3))
    batch = {"idx": text[None, :-1], "targets": text[None, 1:]}
    opt = build_adamw(m.train(), 1e-2, weight_decay=0.0)
    for _ in range(60):
        train_step(m, opt, [batch], loss_fn=lambda mm, b: lm_loss(mm, b, mtp_coef=1.0))
    m.eval()
    g = mtp_generate(m, prompt, p)
    assert g.tokens == generate(m, prompt, p).tokens
    # depth 2 kept 0.55 of its drafts here: its second draft guesses two tokens ahead
    assert g.stats["acceptance_rate"] > (0.6 if depth == 1 else 0.4) and g.stats["target_forwards"] < 20
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3)
    assert len(mtp_generate(m, prompt, sampled).tokens) == 16


def test_bad_configs():
    from llmkit.errors import LLMKitError

    with pytest.raises(LLMKitError, match="mla"):
        ModelConfig(attention="mla", kv_lora_rank=0)
    with pytest.raises(LLMKitError, match="n_group"):
        ModelConfig.from_preset("tiny-deepseek", n_group=3)
    with pytest.raises(LLMKitError, match="router_scoring"):
        ModelConfig.from_preset("tiny-deepseek", router_scoring="softplus")
    with pytest.raises(LLMKitError, match="multi-token"):
        mtp_generate(Transformer(ModelConfig.from_preset("tiny-deepseek")).eval(), [1, 2], SamplingParams())


def test_mtp_modules_round_trip_through_hf_layout(tmp_path):
    """MTP module k is written as layers.{n_layer + k} (V3's layers.61 layout) and read back when asked."""
    from llmkit.checkpoint import load_hf_model, save_hf_model
    from llmkit.checkpoint.hf import config_from_hf, read_config_json

    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny-deepseek", mtp_depth=1)).eval()
    save_hf_model(m, tmp_path)
    hf_cfg = read_config_json(tmp_path)
    assert hf_cfg["model_type"] == "deepseek_v3" and hf_cfg["num_nextn_predict_layers"] == 1
    assert load_hf_model(tmp_path).mtp is None  # as transformers: the MTP layers are skipped by default
    m2 = load_hf_model(tmp_path, cfg=config_from_hf(hf_cfg, mtp_depth=1))
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        h = m(ids, return_hidden=True)
        a = m.mtp_forward(0, h[:, :9], ids[:, 1:], torch.arange(9))[1]
        b = m2.mtp_forward(0, m2(ids, return_hidden=True)[:, :9], ids[:, 1:], torch.arange(9))[1]
    assert torch.equal(a, b)
