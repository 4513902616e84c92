"""The baselines' losses through `algo.get_policy_loss("ppo")` against values computed by hand.

One group of 3 completions of 2 tokens each (no padding), token-mean aggregation so the loss is the plain mean
of the 6 token losses. Row 2 is the extra trajectory (policy_id = 1), rows 0-1 are on-policy.

    LUFFY (guide_is luffy): guide token loss −A · p / (p + γ), p = π_θ(token) = exp(logp), γ = 0.1; the
        behaviour log-prob is never read (π_teacher ≡ 1). With clip_on_policy = false an on-policy token's loss
        is −A · r, r = π_θ / π_old, however far r is from 1.
    ExGRPO (guide_is exgrpo): guide token loss −A · w / (w + γ), w = π_θ / π_recorded.
"""

from __future__ import annotations

import math

import pytest
import torch

from npo_engine import algo
from npo_engine.config import AlgoConfig

GAMMA = 0.1
ADVANTAGES = [0.5, -1.0, 2.0]
LOGP = [[math.log(0.5), math.log(0.2)], [math.log(0.3), math.log(0.9)], [math.log(0.4), math.log(0.05)]]
# Behaviour log-probs: rows 0-1 give ratios r = [3.0, 0.1] and [0.25, 1.0]; row 2 is the extra trajectory.
BEHAVIOR = [[math.log(0.5 / 3.0), math.log(0.2 / 0.1)], [math.log(0.3 / 0.25), math.log(0.9)],
            [math.log(0.8), math.log(0.1)]]


def loss(guide_transform: str, **algo_fields) -> float:
    cfg = AlgoConfig(loss_agg="token-mean", **algo_fields)
    value, _ = algo.get_policy_loss("ppo")(
        torch.tensor(LOGP, dtype=torch.float64), torch.tensor(BEHAVIOR, dtype=torch.float64),
        torch.tensor(ADVANTAGES, dtype=torch.float64), torch.ones(3, 2, dtype=torch.bool), cfg,
        policy_id=torch.tensor([0, 0, 1]), norm_length=2, guide_transform=guide_transform, shaping_gamma=GAMMA,
        backend="torch")
    return float(value)


def on_policy_unclipped() -> list[float]:
    # −A · r on rows 0-1: r = [3.0, 0.1] (A = 0.5) and [0.25, 1.0] (A = −1).
    return [-0.5 * 3.0, -0.5 * 0.1, 1.0 * 0.25, 1.0 * 1.0]


def on_policy_clipped() -> list[float]:
    # max(−A·r, −A·clip(r, 0.8, 1.2)): row 0 (A > 0): 3.0 -> clipped term −0.5·1.2 is larger; 0.1 -> −0.05 is
    # larger than −0.4. Row 1 (A < 0): 0.25 -> −A·0.8 = 0.8 is larger; 1.0 stays.
    return [-0.5 * 1.2, -0.5 * 0.1, 0.8, 1.0]


def test_luffy_guide_tokens_and_unclipped_on_policy_tokens():
    p = [0.4, 0.05]
    guide = [-2.0 * x / (x + GAMMA) for x in p]  # −A · p/(p + γ) = [−1.6, −0.6667]
    expected = sum(on_policy_unclipped() + guide) / 6
    assert loss("luffy", clip_on_policy=False) == pytest.approx(expected, rel=1e-12)
    # With the clip on (the default), only the on-policy part changes.
    assert loss("luffy") == pytest.approx(sum(on_policy_clipped() + guide) / 6, rel=1e-12)


def test_exgrpo_guide_tokens_use_the_recorded_ratio():
    w = [0.4 / 0.8, 0.05 / 0.1]  # π_θ / π_recorded = [0.5, 0.5]
    guide = [-2.0 * x / (x + GAMMA) for x in w]  # [−1.6667, −1.6667]
    assert loss("exgrpo") == pytest.approx(sum(on_policy_clipped() + guide) / 6, rel=1e-12)


def test_unclipped_ratio_far_from_one_keeps_its_gradient():
    # clip_on_policy = false: a token at r = 3 (far above 1 + clip_high) still gets dL/dlogp = −A·r.
    logp = torch.tensor([[math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    cfg = AlgoConfig(loss_agg="token-mean", clip_on_policy=False)
    value, metrics = algo.get_policy_loss("ppo")(logp, torch.zeros(1, 1, dtype=torch.float64),
                                                 torch.tensor([0.5], dtype=torch.float64),
                                                 torch.ones(1, 1, dtype=torch.bool), cfg, policy_id=None,
                                                 norm_length=1, backend="torch")
    value.backward()
    assert float(value.detach()) == pytest.approx(-1.5, rel=1e-12)
    assert float(logp.grad) == pytest.approx(-1.5, rel=1e-12)
    assert float(metrics["pg/clipfrac"]) == 0.0
