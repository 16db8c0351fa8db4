"""Pruning (llmkit/compress/prune.py, `llmkit prune`): exact sparsity, Wanda against a hand computation and
an independent reference, structured pruning equal to masking the removed units in the original model."""

import copy
import json
import re

import pytest
import torch

from _shared import byte_chat_tokenizer, tiny_llama
from llmkit.checkpoint import load_checkpoint, save_checkpoint
from llmkit.cli import main
from llmkit.compress.prune import (_zero_lowest, angular_distances, calibration_ids, prunable_linears, prune,
                                   sparsity_of)
from llmkit.errors import LLMKitError
from llmkit.models import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=4, t=24, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7])
def test_magnitude_layer_zeroes_exactly_the_smallest(s):
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    prune(model, "magnitude", s)
    for name, m in prunable_linears(model).items():
        w0 = dense[name]
        k = int(s * w0.numel() + 0.5)
        assert int((m.weight == 0).sum()) == k, name
        order = w0.abs().flatten().argsort()  # reference: the k smallest |W| by a full sort
        expect = w0.flatten().clone()
        expect[order[:k]] = 0
        torch.testing.assert_close(m.weight.flatten(), expect, rtol=0, atol=0)
    # untouched: embeddings, norms
    assert int((model.embed_tokens.weight == 0).sum()) == 0


def test_magnitude_global_exact_count_and_one_threshold():
    model = tiny_llama()
    ws0 = torch.cat([m.weight.detach().abs().flatten() for m in prunable_linears(model).values()])
    _, r = prune(model, "magnitude", 0.6, scope="global")
    ws = torch.cat([m.weight.detach().flatten() for m in prunable_linears(model).values()])
    k = int(0.6 * ws.numel() + 0.5)
    assert int((ws == 0).sum()) == k and r["achieved_sparsity"] == k / ws.numel()
    assert ws0[ws == 0].max() <= ws0[ws != 0].min()  # every pruned |W| below every kept one
    per_layer = [float((m.weight == 0).float().mean()) for m in prunable_linears(model).values()]
    assert max(per_layer) - min(per_layer) > 0.05  # global: layers end uneven


def test_wanda_score_by_hand():
    # W (2, 4), ‖X_j‖ = (1, 4, 0.5, 2): S = |W|·‖X‖ = [[1, 8, 1.5, 2], [3, 4, 2, 0.5]]
    w = torch.tensor([[1.0, -2.0, 3.0, 1.0], [-3.0, 1.0, 4.0, -0.25]])
    xnorm = torch.tensor([1.0, 4.0, 0.5, 2.0])
    _zero_lowest(w, w.abs() * xnorm, 2, dim=1)  # 50%: the two lowest scores of each row
    assert w.tolist() == [[0.0, -2.0, 0.0, 1.0], [-3.0, 1.0, 0.0, 0.0]]
    # magnitude alone would have kept 3.0 in row 0 and 4.0 in row 1 either way but dropped -2.0:
    w2 = torch.tensor([[1.0, -2.0, 3.0, 1.0]])
    _zero_lowest(w2, w2.abs(), 2, dim=1)
    assert w2.tolist() == [[0.0, -2.0, 3.0, 0.0]]


def test_wanda_matches_reference_on_first_block():
    """Block 0 sees the dense embeddings, so its masks can be computed independently from a dense forward:
    hooks collect ‖X_j‖ over the calibration tokens, each row keeps its in - round(s·in) largest |W|·‖X‖."""
    model, s, ids = tiny_llama(), 0.5, calib()
    ref = copy.deepcopy(model)
    sumsq = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: sumsq.__setitem__(
        n, sumsq.get(n, 0) + a[0].reshape(-1, a[0].size(-1)).double().pow(2).sum(0)))
        for n, m in prunable_linears(ref).items() if n.startswith("layers.0.")]
    with torch.no_grad():
        ref(ids)
    for h in hooks:
        h.remove()
    _, r = prune(model, "wanda", s, ids, batch=3)  # chunks of 3 rows: the sums must pool the chunks
    pruned = prunable_linears(model)
    for name, ss in sumsq.items():
        w0 = prunable_linears(ref)[name].weight.detach()
        score = w0.abs() * ss.sqrt().float()
        k = int(s * w0.size(1) + 0.5)
        drop = score.argsort(dim=1)[:, :k]
        expect = w0.clone().scatter_(1, drop, 0)
        torch.testing.assert_close(pruned[name].weight, expect, rtol=0, atol=0)
    for m in pruned.values():  # every row of every matrix: exactly round(s·in) zeros
        assert ((m.weight == 0).sum(1) == int(s * m.in_features + 0.5)).all()
    assert r["achieved_sparsity"] == sparsity_of(model) == 0.5


def masked_copy(model, mlp_keep=None, head_keep=None):
    """The original model with the removed units' output columns zeroed: what a structured pruning must equal."""
    m = copy.deepcopy(model)
    D = model.cfg.head_dim
    with torch.no_grad():
        for i, block in enumerate(m.layers):
            if mlp_keep is not None:
                gone = torch.ones(model.cfg.d_ff, dtype=torch.bool)
                gone[mlp_keep[i]] = False
                block.mlp.down_proj.weight[:, gone] = 0
            if head_keep is not None:
                for h in range(model.cfg.n_head):
                    if h not in head_keep[i]:
                        block.self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
    return m


def kept_mlp_channels(orig, pruned):
    """Which original channels each layer kept, read back from the copied gate rows."""
    out = []
    for a, b in zip(orig.layers, pruned.layers):
        g0, g1 = a.mlp.gate_proj.weight, b.mlp.gate_proj.weight
        out.append([int((g0 == row).all(1).nonzero()[0]) for row in g1])
    return out


def test_structured_mlp_equals_masking_and_keeps_the_important_channels(tmp_path):
    model, ids = tiny_llama(), calib()
    new, r = prune(copy.deepcopy(model), "structured", 0.3, ids, target="mlp")
    F = model.cfg.d_ff
    keep = F - int(0.3 * F + 0.5)
    assert new.cfg.d_ff == keep and r["d_ff"] == [F, keep]
    for b in new.layers:
        assert b.mlp.gate_proj.weight.shape == (keep, 64) and b.mlp.down_proj.weight.shape == (64, keep)
    assert r["params_after"] == r["params_before"] - model.cfg.n_layer * 3 * 64 * (F - keep)
    assert r["achieved_sparsity"] == pytest.approx(1 - sum(m.weight.numel() for m in prunable_linears(new).values())
                                                   / r["prunable_weights"])
    kept = kept_mlp_channels(model, new)
    assert all(k == sorted(k) for k in kept)
    # the importance (‖x_j‖·‖W_down[:, j]‖ over the calibration tokens) of every kept channel >= every removed one
    acts = {}
    hooks = [b.mlp.down_proj.register_forward_pre_hook(lambda mod, a, i=i: acts.__setitem__(i, a[0]))
             for i, b in enumerate(model.layers)]
    with torch.no_grad():
        ref_logits = masked_copy(model, mlp_keep=kept)(ids)
        model(ids)
    for h in hooks:
        h.remove()
    for i, b in enumerate(model.layers):
        imp = acts[i].reshape(-1, F).norm(dim=0) * b.mlp.down_proj.weight.norm(dim=0)
        gone = [j for j in range(F) if j not in kept[i]]
        assert imp[kept[i]].min() >= imp[gone].max() - 1e-6
    with torch.no_grad():
        torch.testing.assert_close(new(ids), ref_logits, rtol=1e-4, atol=1e-5)
    # a normal checkpoint: saves, loads with its smaller config, same outputs
    save_checkpoint(new, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == new.cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), new(ids))


def test_structured_heads_within_kv_groups_equal_masking():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama", n_head=8, n_kv_head=2, vocab_size=260))
    ids = calib()
    new, r = prune(copy.deepcopy(model), "structured", 0.25, ids, target="heads")  # 4 per group -> 3
    cfg = new.cfg
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (6, 2, 8) and r["n_head"] == [8, 6]
    D = 8
    kept = []
    for a, b in zip(model.layers, new.layers):
        q0, q1 = a.self_attn.q_proj.weight.view(8, D, -1), b.self_attn.q_proj.weight.view(6, D, -1)
        heads = [int(((q0 == h).flatten(1).all(1)).nonzero()[0]) for h in q1]
        assert [h // 4 for h in heads] == [0, 0, 0, 1, 1, 1]  # three from each KV group, in order
        torch.testing.assert_close(b.self_attn.k_proj.weight, a.self_attn.k_proj.weight)  # K/V untouched
        kept.append(heads)
    masked = masked_copy(model, head_keep=kept)
    with torch.no_grad():
        torch.testing.assert_close(new(ids), masked(ids), rtol=1e-4, atol=1e-5)
    # the KV-cache decode path runs on the pruned shape and agrees with the masked model
    from llmkit.inference import SamplingParams, generate
    params = SamplingParams(max_new_tokens=6)
    assert generate(new, ids[0, :5].tolist(), params).tokens == generate(masked, ids[0, :5].tolist(), params).tokens


def test_structured_layers_drop_the_closest_run():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama", n_layer=4, vocab_size=260))
    ids = calib()
    d = angular_distances(model, ids, 2)
    assert d.shape == (3,) and (d >= 0).all() and (d <= 1).all()
    new, r = prune(copy.deepcopy(model), "structured", 0.5, ids, target="layers")
    start = int(d.argmin())
    assert r["removed_layers"] == [start, start + 1] and new.cfg.n_layer == 2
    ref = copy.deepcopy(model)
    ref.layers = torch.nn.ModuleList(b for i, b in enumerate(ref.layers) if i not in (start, start + 1))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), ref(ids))
    assert [b.self_attn.layer_idx for b in new.layers] == [0, 1]  # cache slots renumbered


@pytest.mark.parametrize("kw, msg", [
    (dict(method="magnitude", sparsity=1.0), "sparsity 1.0 is outside [0, 1)"),
    (dict(method="wanda", sparsity=-0.1), "sparsity -0.1 is outside [0, 1)"),
    (dict(method="wandaa", sparsity=0.5), "unknown pruning method 'wandaa' (did you mean 'wanda'?)"),
    (dict(method="structured", sparsity=0.9, target="layers"), "sparsity 0.9 would remove all 2 layers"),
    (dict(method="structured", sparsity=0.8, target="heads"), "would remove all 2 query heads of every KV group"),
    (dict(method="structured", sparsity=0.5, target="mpl"), "unknown structured target 'mpl'"),
    (dict(method="magnitude", sparsity=0.5, scope="globl"), "unknown magnitude scope 'globl'"),
])
def test_bad_options_name_the_value(kw, msg):
    with pytest.raises(LLMKitError, match=re.escape(msg)):
        prune(tiny_llama(), calibration=calib(), **kw)


def test_calibration_ids_rows_and_empty_text():
    tok = byte_chat_tokenizer()
    ids = calibration_ids(tok, "abcdefghij" * 10, n_seq=3, seq_len=16)
    assert ids.shape == (3, 16) and ids[0].tolist() == tok.encode("abcdefghijabcdef")
    assert calibration_ids(tok, "short", n_seq=4, seq_len=64).shape == (1, 5)
    with pytest.raises(LLMKitError, match="empty"):
        calibration_ids(tok, "  \n", source="calib.txt")


@pytest.fixture
def tiny_ckpt(tmp_path):
    d = tmp_path / "tiny"
    save_checkpoint(tiny_llama(), d, byte_chat_tokenizer())
    return d


def test_cli_prune_writes_a_checkpoint_that_loads(tmp_path, tiny_ckpt, capsys):
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "mlp"
    rc = main(["prune", "--model", str(tiny_ckpt), "--method", "structured", "--target", "mlp", "--sparsity", "0.5",
               "--calibration", str(calib_file), "--calib-seqs", "4", "--calib-len", "64", "--out", str(out)])
    assert rc == 0
    model, meta = load_checkpoint(out)
    assert model.cfg.d_ff == 86 and meta["pruning"]["d_ff"] == [172, 86]
    assert meta["pruning"]["calibration"] == str(calib_file)
    info = json.loads((out / "config.json").read_text())
    assert info["intermediate_size"] == 86  # the HF config agrees with the shapes
    out2 = tmp_path / "wanda"
    assert main(["prune", "--model", str(tiny_ckpt), "--method", "wanda", "--sparsity", "0.5",
                 "--calib-seqs", "2", "--calib-len", "32", "--out", str(out2)]) == 0  # packaged calibration
    model2, meta2 = load_checkpoint(out2)
    assert sparsity_of(model2) == 0.5 and meta2["pruning"]["calibration"].startswith("tinyshakespeare")
    # nothing overwritten without --force, and the refusal comes before any work
    assert main(["prune", "--model", str(tiny_ckpt), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(out2)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_ckpt), "--method", "magnitude", "--sparsity", "0.2",
                 "--out", str(out2), "--force"]) == 0
    assert sparsity_of(load_checkpoint(out2)[0]) == pytest.approx(0.2, abs=1e-4)


@pytest.mark.parametrize("args, msg", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1)"),
    (["--method", "prune-it", "--sparsity", "0.5"], "unknown pruning method 'prune-it'"),
    (["--method", "structured", "--target", "layers", "--sparsity", "0.9"], "would remove all 2 layers"),
    (["--method", "wanda", "--sparsity", "0.5", "--calibration", "EMPTY"], "is empty"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, tiny_ckpt, capsys, args, msg):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    rc = main(["prune", "--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_recovery_lora_lowers_the_loss_and_keeps_the_zeros():
    from llmkit.compress.prune import recover
    from llmkit.losses import cross_entropy

    model, ids = tiny_llama(), calib(n=4, t=32)
    prune(model, "wanda", 0.5, ids)
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    with torch.no_grad():
        before = float(cross_entropy(model(ids[:, :-1]), ids[:, 1:]))
    r = recover(model, ids, steps=30, lr=1e-2, batch=4)
    with torch.no_grad():
        after = float(cross_entropy(model(ids[:, :-1]), ids[:, 1:]))
    assert after < before - 0.1 and r["loss_last"] < r["loss_first"]
    assert set(prunable_linears(model)) == set(zeros)  # plain linears again (LoRA merged and unloaded)
    for n, m in prunable_linears(model).items():
        assert torch.equal(m.weight == 0, zeros[n]), n  # exactly the pruned zeros, no more, no fewer
    assert all(p.requires_grad for p in model.parameters()) and not model.training
