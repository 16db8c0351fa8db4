"""Knowledge distillation: the loss against its closed form and references (F.kl_div, trl's GKD loss),
the top-k form, the depth-pruned student, the recipe end to end on tiny random models (it learns, it
writes a checkpoint, the top-k cache is reused, nothing is overwritten without --force, a vocabulary
mismatch is a one-line error), and the distilled draft's speculative output equal to the target's greedy."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _shared import byte_chat_tokenizer, tiny_llama

from llmkit.errors import LLMKitError
from llmkit.losses import distill_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(seed=0, B=2, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # unscored (prompt) positions
    return s, t, labels


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distill_loss_closed_form(tau, alpha):
    s, t, labels = _logits()
    loss, m = distill_loss(s, t, labels, temperature=tau, alpha=alpha)
    # closed form, one scored position at a time: α τ² Σ_i p_i log(p_i / q_i) − (1 − α) log softmax(s)[y]
    total, n = 0.0, 0
    for b in range(s.size(0)):
        for i in range(s.size(1)):
            y = int(labels[b, i])
            if y == -100:
                continue
            p = [math.exp(x / tau) for x in t[b, i].tolist()]
            q = [math.exp(x / tau) for x in s[b, i].tolist()]
            p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
            kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            ce = -(s[b, i, y].item() - math.log(sum(math.exp(x) for x in s[b, i].tolist())))
            total += alpha * tau * tau * kl + (1 - alpha) * ce
            n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    # the soft term is torch's KL divergence (its arguments are swapped: input = log q, target = log p)
    keep = labels != -100
    ref_kl = F.kl_div(F.log_softmax(s[keep] / tau, -1), F.log_softmax(t[keep] / tau, -1), log_target=True,
                      reduction="batchmean")
    assert m["kl"].item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert m["ce"].item() == pytest.approx(F.cross_entropy(s[keep], labels[keep]).item(), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distill_loss_is_trl_gkd_at_beta0(tau, monkeypatch):
    """trl's generalized JSD at beta = 0 is KL(teacher ‖ student) at τ, token mean, without the τ² factor."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, labels = _logits(1)
    ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0, temperature=tau)
    ours, _ = distill_loss(s, t, labels, temperature=tau, alpha=1.0)
    assert ours.item() == pytest.approx(tau * tau * ref.item(), rel=1e-5)


def test_distill_loss_topk_and_gradients():
    s, t, labels = _logits(2)
    s.requires_grad_(True)
    full, _ = distill_loss(s, t, labels, 2.0, 0.7)
    values, ids = t.topk(t.size(-1), dim=-1)  # k = V: the top-k form is exact
    topk, _ = distill_loss(s, values, labels, 2.0, 0.7, teacher_indices=ids)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)
    values, ids = t.topk(3, dim=-1)  # k < V: the teacher renormalised over its top 3, KL still >= 0
    _, m = distill_loss(s, values, labels, 2.0, 1.0, teacher_indices=ids)
    assert m["kl"].item() > 0
    full.backward()
    assert s.grad[0, :2].abs().sum() == 0 and s.grad[1].abs().sum() > 0  # unscored positions get no gradient
    same, m = distill_loss(t, t, labels, 3.0, 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_depth_pruned_student():
    from llmkit.recipes.distill import depth_pruned

    teacher = tiny_llama(0)
    x = torch.randint(0, 260, (1, 12))
    full = depth_pruned(teacher, 2)
    with torch.no_grad():
        assert torch.allclose(full(x), teacher(x), atol=1e-6)  # all blocks kept: the same model
    one = depth_pruned(teacher, 1, keep="first")
    assert one.cfg.n_layer == 1 and torch.equal(one.layers[0].mlp.down_proj.weight,
                                                teacher.layers[0].mlp.down_proj.weight)
    one.embed_tokens.weight.data.zero_()  # a copy: the teacher is untouched
    assert teacher.embed_tokens.weight.abs().sum() > 0
    with pytest.raises(LLMKitError, match="1..2"):
        depth_pruned(teacher, 3)


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def _cfg(tmp_path, **over):
    from llmkit.config import load_config
    from llmkit.recipes.distill import DistillConfig

    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    kv = {"teacher": "tiny", "student.layers": 1, "data.files": str(text), "data.seq_len": 64,
          "data.val_fraction": 0.1, "train.steps": 12, "train.batch_size": 4, "train.eval_every": 0,
          "train.progress": "false", "train.out_dir": str(tmp_path / "out"), "optim.lr": 3e-3,
          "optim.warmup_steps": 2, "student.freeze_embeddings": "false", "distill.alpha": 1.0, **over}
    return load_config(DistillConfig, None, [f"{k}={v}" for k, v in kv.items()])


def test_distill_recipe_learns_and_drafts(tmp_path, tok):
    from llmkit.checkpoint import load_checkpoint
    from llmkit.inference import SamplingParams, generate, speculative_generate
    from llmkit.recipes.distill import distill

    teacher = tiny_llama(0)
    with torch.no_grad():
        teacher.norm.weight.mul_(8)  # peaked next-token distributions: a random tiny model's are near uniform
    s = distill(_cfg(tmp_path), teacher=teacher, tokenizer=tok, quiet=True)
    out = tmp_path / "out"
    assert s["val_after"]["val_kl"] < 0.7 * s["val_before"]["val_kl"]  # the student moved toward the teacher
    assert (out / "loss.png").exists() and json.loads((out / "distill.json").read_text())["summary"]["steps"] == 12
    student, _ = load_checkpoint(out)
    assert student.cfg.n_layer == 1
    with pytest.raises(LLMKitError, match="already exists"):  # nothing overwritten without force
        distill(_cfg(tmp_path), teacher=teacher, tokenizer=tok, quiet=True)
    # the distilled draft: speculative output token for token the target's greedy output
    prompt = tok.encode("the cat sat")
    params = SamplingParams(max_new_tokens=24)
    greedy = generate(teacher, prompt, params)
    for k in (2, 4):
        spec = speculative_generate(teacher, student, prompt, params, k=k)
        assert spec.tokens == greedy.tokens
        assert spec.stats["proposed"] > 0


def test_distill_topk_cache_reused(tmp_path, tok):
    from llmkit.recipes.distill import distill

    teacher = tiny_llama(0)
    over = {"distill.topk_cache": str(tmp_path / "cache"), "distill.topk": 8, "train.steps": 3}
    first = distill(_cfg(tmp_path, **over), teacher=teacher, tokenizer=tok, quiet=True)
    assert first["topk_cache_misses"] == 3 and first["topk_cache_hits"] == 0
    again = distill(_cfg(tmp_path, **over, **{"distill.temperature": 1.0}), teacher=teacher, tokenizer=tok,
                    quiet=True, force=True)
    assert again["topk_cache_hits"] == 3 and again["topk_cache_misses"] == 0
    with pytest.raises(LLMKitError, match="topk"):  # a cache of another k is refused
        distill(_cfg(tmp_path, **{**over, "distill.topk": 4}), teacher=teacher, tokenizer=tok, quiet=True,
                force=True)


def test_cli_distill_bad_input(tmp_path, tok, capsys):
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main

    save_checkpoint(tiny_llama(0), tmp_path / "teacher", tokenizer=tok)
    save_checkpoint(tiny_llama(1, vocab_size=300), tmp_path / "other", tokenizer=tok)
    text = tmp_path / "t.txt"
    text.write_text("hello there, general kenobi. " * 40)
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(text), "--out", str(tmp_path / "s"),
            "train.steps=1", "train.batch_size=2", "data.seq_len=32", "train.progress=false"]
    assert main(args + ["--student", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "300" in err and "260" in err and len(err.splitlines()) == 1
    assert main(args + ["--student", "tiny-llama"]) == 0  # a preset takes the teacher's vocabulary
    capsys.readouterr()
    assert main(args + ["--student-layers", "1"]) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--student-layers", "1", "--force"]) == 0
    assert main(args + ["--student-layers", "1", "--student", "tiny-llama", "--force"]) == 2
    assert "one of" in capsys.readouterr().err


def test_bench_decode_with_drafts(tmp_path, tok, capsys):
    """`llmkit bench decode --draft-model/--draft-layers/--speculative-k` on tiny checkpoints: every
    speculative run's output equals plain greedy, with its acceptance, draft cost and expected speed-up."""
    from llmkit.checkpoint import save_checkpoint
    from llmkit.cli import main
    from llmkit.cli.bench import expected_speedup

    assert expected_speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)  # nothing accepted: pure draft overhead
    assert expected_speedup(1.0, 3, 0.0) == pytest.approx(4.0)  # a free, perfect draft: k + 1 tokens a step
    assert expected_speedup(0.5, 2, 0.1) == pytest.approx((1 - 0.5 ** 3) / (0.5 * 1.2))
    save_checkpoint(tiny_llama(0), tmp_path / "target", tokenizer=tok)
    save_checkpoint(tiny_llama(1), tmp_path / "draft", tokenizer=tok)
    args = ["bench", "decode", "--model", str(tmp_path / "target"), "--prompt-tokens", "16", "--new-tokens", "12",
            "--repeat", "1", "--threads", "1", "--device", "cpu"]
    assert main(args + ["--draft-model", str(tmp_path / "draft"), "--draft-layers", "1", "--speculative-k", "2,3",
                        "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)["speculative"]
    assert len(spec) == 4
    for r in spec.values():
        assert r["identical_to_greedy"] and 0 <= r["acceptance_rate"] <= 1
        assert r["draft_cost_ratio"] > 0 and r["expected_speedup"] > 0
    assert main(args + ["--draft-layers", "1", "--speculative-k", "0"]) == 2
    assert ">= 1" in capsys.readouterr().err


def test_distill_resume_reproduces_the_uninterrupted_run(tmp_path, tok, monkeypatch):
    """Cut during step 5 of 6 (last checkpoint: step 4), resume: the same losses as a run never cut."""
    import llmkit.recipes.distill as rd
    from llmkit.recipes.distill import distill
    from llmkit.train.loop import read_metrics

    over = {"train.steps": 6, "train.ckpt_every": 2, "train.eval_every": 3}
    teacher = tiny_llama(0)
    distill(_cfg(tmp_path, **over, **{"train.out_dir": str(tmp_path / "ref")}), teacher=teacher, tokenizer=tok,
            quiet=True)
    real, calls = rd.train_step, []

    def dies_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    cut = _cfg(tmp_path, **over, **{"train.out_dir": str(tmp_path / "cut")})
    monkeypatch.setattr(rd, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(cut, teacher=teacher, tokenizer=tok, quiet=True)
    monkeypatch.undo()
    with pytest.raises(LLMKitError, match="interrupted run"):
        distill(cut, teacher=teacher, tokenizer=tok, quiet=True)
    distill(cut, teacher=teacher, tokenizer=tok, quiet=True, resume=True)
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("ref", "cut"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for k in ("loss", "val_kl"):
            assert (k in ra) == (k in rb) and abs(ra.get(k, 0) - rb.get(k, 0)) < 1e-5
