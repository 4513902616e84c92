"""NPO's pure parts against hand-computed values: the gate, mixed-group advantages, each guide IS mode."""

import math

import pytest
import torch

from npo_engine import algo
from npo_engine.config import AlgoConfig


def _correct(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_gate_is_inclusive_and_needs_an_entry():
    # n = 8, gate 0.6: at most 4.8 of 8 correct, so 4 injects and 5 does not.
    correct = _correct([[1, 1, 1, 1, 0, 0, 0, 0],    # 4/8 = 0.5   -> gated
                        [1, 1, 1, 1, 1, 0, 0, 0],    # 5/8 = 0.625 -> not gated
                        [0] * 8,                     # 0/8         -> gated, but no cache entry
                        [1] * 8])                    # 8/8
    p_hat, inject = algo.gate_groups(correct, torch.tensor([True, True, False, True]), 0.6)
    assert p_hat.tolist() == [0.5, 0.625, 0.0, 1.0]
    assert inject.tolist() == [True, False, False, False]


def test_gate_equal_to_accuracy_injects():
    # p̂ = gate exactly (3/5 = 0.6, whose product 0.6 * 5 rounds to 3.0000000000000004): inclusive.
    correct = _correct([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    _, inject = algo.gate_groups(correct, torch.tensor([True, True]), 0.6)
    assert inject.tolist() == [True, False]
    _, inject = algo.gate_groups(_correct([[1, 0]]), torch.tensor([True]), 0.5)
    assert inject.tolist() == [True]


def test_gate_shape_errors():
    with pytest.raises(ValueError, match=r"correct must be \[G, n\]"):
        algo.gate_groups(torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 0.6)
    with pytest.raises(ValueError, match=r"has_entry must be \[G\] = \[2\]"):
        algo.gate_groups(torch.zeros(2, 4, dtype=torch.bool), torch.ones(3, dtype=torch.bool), 0.6)


def test_guide_slot_is_the_last():
    assert algo.guide_slot(8) == 7


def test_mixed_group_advantages_by_hand():
    """Group 0: rewards 0,0,0 on-policy + guide 1 -> mean 0.25, unbiased std sqrt(0.25) = 0.5."""
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    policy = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    adv = algo.compute_advantages(rewards, groups, AlgoConfig(), policy_id=policy, backend="torch")
    eps = 1e-6
    a0 = [(-0.25) / (0.5 + eps)] * 3 + [0.75 / (0.5 + eps)]
    a1 = [0.25 / (0.5 + eps), -0.75 / (0.5 + eps), 0.25 / (0.5 + eps), 0.25 / (0.5 + eps)]
    assert adv.tolist() == pytest.approx(a0 + a1, rel=1e-6)
    # Statistics from on-policy members only (LUFFY's grpo_split): group 0 is all zeros -> std 0.
    adv = algo.compute_advantages(rewards, groups, AlgoConfig(adv_stats="on_policy"), policy_id=policy,
                                  backend="torch")
    m1, s1 = 2 / 3, math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    expected = [0, 0, 0, 1 / (0 + eps), (1 - m1) / (s1 + eps), (0 - m1) / (s1 + eps), (1 - m1) / (s1 + eps),
                (1 - m1) / (s1 + eps)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)


def _one_guide_row():
    """Row 0 on-policy, row 1 guide; two tokens each."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = torch.tensor([0.7, 1.3], dtype=torch.float64)
    return logp, mask, adv, torch.tensor([0, 1])


def _ppo_row(logp, old, a, lo=0.2, hi=0.2):
    """Token mean of max(-A r, -A clip(r)) for one row, written out."""
    out = []
    for lp, ol in zip(logp, old):
        r = math.exp(lp - ol)
        out.append(max(-a * r, -a * min(max(r, 1 - lo), 1 + hi)))
    return sum(out) / len(out)


def test_guide_is_exact_uses_the_recorded_guide_logp():
    logp, mask, adv, policy = _one_guide_row()
    guide_logp = [-0.4, -2.5]     # recorded by the trainer's forward of the guide weights
    behavior = torch.tensor([[-1.0, -2.0], guide_logp], dtype=torch.float64)
    loss, _ = algo.get_policy_loss("ppo")(logp, behavior, adv, mask, AlgoConfig(), policy_id=policy,
                                          norm_length=2, backend="torch")
    expected = (_ppo_row([-1.0, -2.0], [-1.0, -2.0], 0.7) + _ppo_row([-0.5, -1.5], guide_logp, 1.3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_guide_is_none_treats_the_guide_row_as_on_policy():
    logp, mask, adv, policy = _one_guide_row()
    old = torch.tensor([[-1.0, -2.0], [-0.6, -1.4]], dtype=torch.float64)  # π_old recomputed on guide tokens
    loss, _ = algo.get_policy_loss("ppo")(logp, old, adv, mask, AlgoConfig(), policy_id=policy, norm_length=2,
                                          backend="torch")
    expected = (_ppo_row([-1.0, -2.0], [-1.0, -2.0], 0.7) + _ppo_row([-0.5, -1.5], [-0.6, -1.4], 1.3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_guide_is_decoupled_weights_and_loss():
    old = torch.tensor([[-1.0, -2.0], [-0.6, -1.4]], dtype=torch.float64)
    guide = torch.tensor([[-1.0, -2.0], [-0.1, -3.0]], dtype=torch.float64)
    guide_rows = torch.tensor([[False, False], [True, True]])
    w = algo.decoupled_weights(old, guide, guide_rows, cap=2.0)
    # min(exp(old - guide), 2): exp(-0.5) = 0.6065, exp(1.6) = 4.95 -> 2; on-policy rows get 0 here.
    assert w.flatten().tolist() == pytest.approx([0.0, 0.0, math.exp(-0.5), 2.0], rel=1e-12)

    logp, mask, adv, policy = _one_guide_row()
    per_token_adv = adv[:, None] * torch.where(guide_rows, w, 1.0)   # what the trainer folds in
    loss, _ = algo.get_policy_loss("ppo")(logp, old, per_token_adv, mask, AlgoConfig(), policy_id=policy,
                                          norm_length=2, backend="torch")
    guide_terms = [wk * max(-1.3 * math.exp(lp - ol), -1.3 * min(max(math.exp(lp - ol), 0.8), 1.2))
                   for wk, lp, ol in zip([math.exp(-0.5), 2.0], [-0.5, -1.5], [-0.6, -1.4])]
    expected = (_ppo_row([-1.0, -2.0], [-1.0, -2.0], 0.7) + sum(guide_terms) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert algo.needs_old_logp("decoupled") and algo.needs_old_logp("none") and not algo.needs_old_logp("exact")


def test_decoupled_weight_cannot_overflow():
    w = algo.decoupled_weights(torch.tensor([[0.0]]), torch.tensor([[-1e4]]), torch.ones(1, 1, dtype=torch.bool),
                               cap=3.0)
    assert w.item() == pytest.approx(3.0)


@pytest.mark.parametrize("agg, expected", [("token-mean", [2.0, 3.0, 0.0]), ("seq-mean-token-mean", [1, 1, 0]),
                                           ("seq-mean-token-sum", [1, 1, 0]), ("seq-mean-token-sum-norm", [1, 1, 1])])
def test_loss_units(agg, expected):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert algo.loss_units(mask, agg).tolist() == expected


def test_loss_units_is_the_kernels_denominator():
    """Splitting a batch into micro-batches and weighting each one's loss by its units reproduces the loss of
    the whole batch, for every aggregation."""
    from npo_kernels import policy_loss

    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    mask[4] = False
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        whole, _ = policy_loss(logp, old, adv, mask, agg=agg, norm_length=5, backend="torch")
        units = algo.loss_units(mask, agg)
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], agg=agg, norm_length=5,
                                backend="torch")[0] * units[i:i + 2].sum() / units.sum() for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12), agg
