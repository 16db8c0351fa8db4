"""GRPO / PPO loss pieces (llmkit.losses) against hand-computed values (explicit Python loops over the
formulas) and, for GRPO, against trl's GRPOTrainer loss computation on the same log-probs."""

import math
import types
from collections import defaultdict

import pytest
import torch

from llmkit.losses import gae, group_advantages, grpo_loss, kl_k3, masked_mean, ppo_losses

torch.manual_seed(0)
B, T = 3, 5
LOGPS = -torch.rand(B, T) * 2
OLD = LOGPS + 0.3 * torch.randn(B, T)  # ratios spread on both sides of the clip range
REF = LOGPS + 0.2 * torch.randn(B, T)
MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
ADV = torch.tensor([1.0, -0.5, 0.8])


def test_k3_by_hand_and_zero_at_the_reference():
    for lp, rp in [(-1.0, -1.5), (-2.0, -0.3), (-0.7, -0.7)]:
        r = math.exp(rp - lp)
        assert float(kl_k3(torch.tensor(lp), torch.tensor(rp))) == pytest.approx(r - math.log(r) - 1, abs=1e-6)
    assert torch.equal(kl_k3(LOGPS, LOGPS), torch.zeros(B, T))
    assert bool((kl_k3(LOGPS, REF) >= 0).all())


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 3.0]])
    got = group_advantages(rewards, eps=1e-4)
    for p, row in enumerate(rewards.tolist()):
        G = len(row)
        mean = sum(row) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (G - 1))  # sample std (Bessel), as trl's nanstd
        for g, x in enumerate(row):
            assert float(got[p, g]) == pytest.approx((x - mean) / (std + 1e-4), abs=1e-5)
    assert torch.equal(got[1], torch.zeros(4))  # equal rewards: no signal


def _grpo_by_hand(clip_eps, beta, per_sequence):
    rows = []
    for b in range(B):
        terms = []
        for t in range(T):
            if not MASK[b, t]:
                continue
            lp, old, ref, a = float(LOGPS[b, t]), float(OLD[b, t]), float(REF[b, t]), float(ADV[b])
            rho = math.exp(lp - old)
            surr = min(rho * a, min(max(rho, 1 - clip_eps), 1 + clip_eps) * a)
            k3 = math.exp(ref - lp) - (ref - lp) - 1
            terms.append(-surr + beta * k3)
        rows.append(terms)
    if per_sequence:
        return sum(sum(r) / len(r) for r in rows) / B
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_grpo_loss_by_hand(per_sequence):
    loss, m = grpo_loss(LOGPS, OLD, REF, ADV, MASK, clip_eps=0.2, beta=0.04, per_sequence=per_sequence)
    assert float(loss) == pytest.approx(_grpo_by_hand(0.2, 0.04, per_sequence), abs=1e-6)
    kl = [math.exp(float(REF[b, t] - LOGPS[b, t])) - float(REF[b, t] - LOGPS[b, t]) - 1
          for b in range(B) for t in range(T) if MASK[b, t]]
    assert float(m["kl"]) == pytest.approx(sum(kl) / len(kl), abs=1e-6)
    clipped = [(math.exp(float(LOGPS[b, t] - OLD[b, t])) > 1.2 and ADV[b] > 0)
               or (math.exp(float(LOGPS[b, t] - OLD[b, t])) < 0.8 and ADV[b] < 0)
               for b in range(B) for t in range(T) if MASK[b, t]]
    assert float(m["clip_frac"]) == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)
    assert 0 < sum(clipped) < len(clipped)  # the case exercises clipping


def test_grpo_at_the_start_of_a_rollout():
    """policy = old = reference: ratio 1, KL 0, loss = -mean advantage over tokens; and n_tokens
    normalisation over two micro-batches adds up to the whole batch's token mean."""
    loss, m = grpo_loss(LOGPS, LOGPS, LOGPS, ADV, MASK)
    assert float(m["kl"]) == 0 and float(m["clip_frac"]) == 0 and float(m["ratio"]) == pytest.approx(1)
    n = MASK.sum(1)
    assert float(loss) == pytest.approx(float(-(ADV * n).sum() / n.sum()), abs=1e-6)
    full, _ = grpo_loss(LOGPS, OLD, REF, ADV, MASK)
    N = float(MASK.sum())
    parts = [grpo_loss(LOGPS[s], OLD[s], REF[s], ADV[s], MASK[s], n_tokens=N / 2)[0]
             for s in (slice(0, 2), slice(2, 3))]
    assert float(sum(parts) / 2) == pytest.approx(float(full), abs=1e-6)


class _Acc:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


@pytest.mark.parametrize("loss_type,per_sequence", [("bnpo", False), ("grpo", True)])
def test_grpo_loss_equals_trls(loss_type, per_sequence):
    """trl's GRPOTrainer._compute_loss run on the same per-token log-probs (its model forward stubbed out)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logps = LOGPS.clone().requires_grad_(True)
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.04,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, accelerator=_Acc())
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": MASK,
              "advantages": ADV, "old_per_token_logps": OLD, "ref_per_token_logps": REF}
    theirs = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    ours, m = grpo_loss(logps, OLD, REF, ADV, MASK, clip_eps=0.2, beta=0.04, per_sequence=per_sequence)
    (g_ours,) = torch.autograd.grad(ours, logps)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)
    assert float(m["kl"]) == pytest.approx(stub._metrics["train"]["kl"][0], abs=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][0], abs=1e-6)


def test_gae_by_hand():
    rewards = torch.randn(B, T)
    values = torch.randn(B, T)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for b in range(B):
        ts = [t for t in range(T) if MASK[b, t]]  # the response: contiguous, value 0 after its end
        for i, t in enumerate(ts):
            a = 0.0
            for k, u in enumerate(ts[i:]):  # A_t = sum_k (γλ)^k δ_{t+k}
                v_next = float(values[b, ts[i + k + 1]]) if i + k + 1 < len(ts) else 0.0
                delta = float(rewards[b, u]) + gamma * v_next - float(values[b, u])
                a += (gamma * lam) ** k * delta
            assert float(adv[b, t]) == pytest.approx(a, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(a + float(values[b, t]), abs=1e-5)
    assert bool((adv[MASK == 0] == 0).all()) and bool((ret[MASK == 0] == 0).all())
    # γ = λ = 1: the advantage is the reward-to-go minus the value (Monte Carlo)
    adv1, _ = gae(rewards, values, MASK, 1.0, 1.0)
    togo = (rewards * MASK).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv1, (togo - values) * MASK)


def test_ppo_losses_by_hand():
    adv = torch.randn(B, T)
    values, old_values, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    entropy = torch.rand(B, T)
    eps, veps, vf, ec = 0.2, 0.3, 0.5, 0.01
    loss, m = ppo_losses(LOGPS, OLD, adv, values, old_values, returns, MASK, clip_eps=eps, value_clip=veps,
                         vf_coef=vf, entropy=entropy, ent_coef=ec)
    pol, val, ent, clip, akl, n = 0.0, 0.0, 0.0, 0, 0.0, 0
    for b in range(B):
        for t in range(T):
            if not MASK[b, t]:
                continue
            n += 1
            lr = float(LOGPS[b, t] - OLD[b, t])
            rho, a = math.exp(lr), float(adv[b, t])
            p1, p2 = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            pol += max(p1, p2)
            clip += p2 > p1
            v, vo, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            vc = vo + min(max(v - vo, -veps), veps)
            val += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            ent += float(entropy[b, t])
            akl += 0.5 * lr ** 2
    assert float(m["policy_loss"]) == pytest.approx(pol / n, abs=1e-6)
    assert float(m["value_loss"]) == pytest.approx(val / n, abs=1e-6)
    assert float(m["entropy"]) == pytest.approx(ent / n, abs=1e-6)
    assert float(m["clip_frac"]) == pytest.approx(clip / n, abs=1e-6)
    assert float(m["approx_kl"]) == pytest.approx(akl / n, abs=1e-6)
    assert float(loss) == pytest.approx(pol / n + vf * val / n - ec * ent / n, abs=1e-6)
    # at the rollout's own policy: ratio 1, nothing clipped, approx KL 0, policy loss = -mean advantage
    _, m0 = ppo_losses(LOGPS, LOGPS, adv, values, values, returns, MASK)
    assert float(m0["approx_kl"]) == 0 and float(m0["clip_frac"]) == 0
    assert float(m0["policy_loss"]) == pytest.approx(float(masked_mean(-adv, MASK)), abs=1e-6)
