"""npo_engine.algo against independent float64 formulas and hand-made cases."""

import math

import pytest
import torch

from npo_engine import algo
from npo_engine.config import AlgoConfig


def _groups_f64(rewards, group_ids):
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def _expected_advantages(rewards, group_ids, mode, eps=1e-6):
    out = [0.0] * len(rewards)
    for members in _groups_f64(rewards, group_ids).values():
        values = [float(rewards[i]) for i in members]
        n = len(values)
        if n == 1:
            continue
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        for i, v in zip(members, values):
            if mode == "grpo":
                out[i] = (v - mean) / (std + eps)
            elif mode == "drgrpo":
                out[i] = v - mean
            else:  # rloo
                out[i] = v - (sum(values) - v) / (n - 1)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
def test_advantages_match_float64_formula(mode):
    gen = torch.Generator().manual_seed(0)
    group_ids = torch.tensor([3, 1, 3, 7, 1, 3, 7, 7, 1, 9])  # shuffled, uneven, one singleton (9)
    rewards = torch.rand(10, generator=gen)
    got = algo.compute_advantages(rewards, group_ids, AlgoConfig(adv_mode=mode))
    want = _expected_advantages(rewards.double().tolist(), group_ids.tolist(), mode)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got[-1] == 0.0  # the singleton group


def test_advantages_all_equal_group_is_zero():
    got = algo.compute_advantages(torch.ones(8), torch.zeros(8, dtype=torch.long), AlgoConfig())
    assert torch.equal(got, torch.zeros(8))


def test_advantages_on_policy_statistics_ignore_the_guide():
    # 3 wrong on-policy samples + 1 correct guide: on_policy stats have std 0, so grpo scales by 1 (documented).
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    policy_id = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    split = algo.compute_advantages(rewards, groups, AlgoConfig(adv_stats="on_policy"), policy_id=policy_id)
    mixed = algo.compute_advantages(rewards, groups, AlgoConfig(adv_stats="all"), policy_id=policy_id)
    assert split[3] > 0 and split[0] == 0  # guide measured against the on-policy mean 0
    assert mixed[0] < 0  # the mixed mean 0.25 makes the wrong on-policy samples negative
    torch.testing.assert_close(split[4:], mixed[4:])  # an all on-policy group is the same either way


def test_ppo_clip_registry_entry_matches_hand_computation():
    loss_fn = algo.get_policy_loss("ppo")
    logp = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]], dtype=torch.float64, requires_grad=True)
    behavior = torch.tensor([[math.log(0.25), math.log(0.9), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, metrics = loss_fn(logp, behavior, adv, mask, AlgoConfig(), norm_length=3)
    # token 0: r = 2 -> clipped to 1.2, L = -1.2; token 1: r = 1, L = -1; seq-mean-token-mean = -1.1
    assert loss.item() == pytest.approx(-1.1)
    assert metrics["pg/clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped token and masked token carry no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)


def test_unknown_policy_loss_lists_choices():
    with pytest.raises(ValueError, match="ppo"):
        algo.get_policy_loss("nope")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(estimator):
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -300.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    got = algo.kl_penalty(logp, ref, mask, estimator)
    expected = []
    for a, b in [(-1.0, -1.5), (-2.0, -1.0)]:
        lr = a - b
        expected.append({"k1": lr, "k2": lr * lr / 2, "k3": math.exp(-lr) - 1 + lr}[estimator])
    torch.testing.assert_close(got[0, :2].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6)
    assert got[0, 2] == 0  # masked, even though its log-ratio is huge


def test_kl_k3_is_nonnegative_and_finite_for_extreme_ratios():
    logp = torch.tensor([[-0.1, -80.0]])
    ref = torch.tensor([[-80.0, -0.1]])
    got = algo.kl_penalty(logp, ref, torch.ones(1, 2), "k3")
    assert torch.isfinite(got).all() and (got >= 0).all()


def test_masked_mean_empty_mask_is_zero():
    assert algo.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert algo.masked_mean(torch.arange(4.0), torch.tensor([1, 0, 1, 0])).item() == 1.0
