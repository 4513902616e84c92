"""Golden values of the PPO policy loss (`algo.get_policy_loss("ppo")`, seq-mean-token-mean) on one fixed batch.

The batch is one GRPO group of 4 completions of one prompt, rewards [1, 0, 0, 0], of 4, 3, 2 and 4 tokens
(T = 4, rows 1 and 2 right-padded). Advantages come from `algo.compute_advantages` (GRPO):
    mean = 0.25, unbiased std = sqrt((0.75² + 3·0.25²) / 3) = sqrt(0.25) = 0.5
    A = (r − mean) / (std + eps) = [1.5, −0.5, −0.5, −0.5] · f,   f = 0.5 / (0.5 + 1e-6)   (eps = 1e-6)
The behaviour log-probs are seeded random numbers; the current log-probs are behaviour + log r for ratios r
chosen below, so every number in the loss is a small fraction (the loss only sees log r and A). Padded
positions hold garbage (logp = +30, behaviour = −inf) that the mask must keep out of the loss and gradient.

Per token (clip_low = clip_high = 0.2, so clip(r) = min(max(r, 0.8), 1.2)):
    L = max(−A·r, −A·clip(r));   "clipped" when the clipped term is strictly larger (then dL/dlogp = 0,
    otherwise dL/dlogp = −A·r).
seq-mean-token-mean: loss = (1/B) Σ_b (1/n_b) Σ_t L[b, t], so dloss/dlogp[b, t] = dL/dlogp[b, t] / (B · n_b).
"""

from __future__ import annotations

import math

import pytest
import torch

from npo_engine import algo
from npo_engine.config import AlgoConfig
from npo_kernels._dispatch import triton_interpreter_enabled

REWARDS = [1.0, 0.0, 0.0, 0.0]
LENGTHS = [4, 3, 2, 4]
F = 0.5 / (0.5 + 1e-6)  # GRPO's eps in the std denominator
ADVANTAGES = [1.5 * F, -0.5 * F, -0.5 * F, -0.5 * F]

# Ratios r = π/π_old per token (0.0 = padding). Row 0 has A > 0, rows 1-3 have A < 0.
RATIOS = [
    [1.5, 0.5, 1.1, 1.0],  # A > 0: 1.5 clipped to 1.2; 0.5 is below the range but not clipped (A > 0)
    [0.5, 1.5, 0.9, 0.0],  # A < 0: 0.5 clipped up to 0.8; 1.5 is above the range but not clipped (A < 0)
    [1.0, 1.0, 0.0, 0.0],
    [2.0, 0.25, 1.0, 1.0],  # A < 0: 2.0 not clipped; 0.25 clipped up to 0.8
]

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_enabled(),
                                                   reason="CPU tensors need TRITON_INTERPRET=1")),
]


def fixed_batch(ratios: list[list[float]]):
    """(logp [4, 4] leaf, behavior_logp [4, 4], advantages [4], mask [4, 4]) for `ratios`, fp32."""
    gen = torch.Generator().manual_seed(1234)
    behavior = -torch.empty(4, 4).exponential_(generator=gen) - 0.05  # seeded log-probs in (−∞, −0.05]
    mask = torch.arange(4)[None, :] < torch.tensor(LENGTHS)[:, None]
    log_r = torch.tensor([[math.log(r) if r > 0 else 0.0 for r in row] for row in ratios])
    logp = torch.where(mask, behavior + log_r, torch.tensor(30.0))  # garbage beyond each row's length
    behavior = torch.where(mask, behavior, torch.tensor(-math.inf))
    advantages = algo.compute_advantages(torch.tensor(REWARDS), torch.zeros(4, dtype=torch.long), AlgoConfig())
    return logp.requires_grad_(True), behavior, advantages, mask


def test_fixed_batch_advantages_are_the_hand_computed_grpo_values():
    _, _, advantages, _ = fixed_batch(RATIOS)
    torch.testing.assert_close(advantages, torch.tensor(ADVANTAGES), atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_on_policy(backend):
    """logp == behaviour (every r = 1): L = −A on every token.

    loss = (1/4) Σ_b (1/n_b) Σ_t (−A_b) = −(1/4) Σ_b A_b = −(1/4)(1.5 − 3·0.5)·f = 0: GRPO advantages of a group
    sum to zero, so the on-policy seq-mean-token-mean loss is 0 whatever the lengths. Its gradient is not:
    dloss/dlogp[b, t] = −A_b / (4 · n_b), i.e. −1.5f/16 on row 0, +0.5f/12 on row 1, +0.5f/8 on row 2,
    +0.5f/16 on row 3, and 0 on padding.
    """
    logp, behavior, advantages, mask = fixed_batch([[1.0 if r else 0.0 for r in row] for row in RATIOS])
    loss, metrics = algo.get_policy_loss("ppo")(logp, behavior, advantages, mask, AlgoConfig(), norm_length=4,
                                                 backend=backend)
    assert abs(loss.item()) < 1e-6
    assert metrics["pg/clipfrac"].item() == 0.0
    assert metrics["pg/ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["pg/ppo_kl"].item() == pytest.approx(0.0, abs=1e-6)

    loss.backward()
    per_token = [-1.5 * F / 16, 0.5 * F / 12, 0.5 * F / 8, 0.5 * F / 16]
    expected = torch.tensor(per_token)[:, None] * mask
    torch.testing.assert_close(logp.grad, expected, atol=1e-7, rtol=1e-6)


# Token losses L = max(−A·r, −A·clip(r)) in units of f (A = 1.5f or −0.5f); * marks a clipped token:
#   row 0, A = 1.5:  −1.5·1.2* = −1.8, −1.5·0.5 = −0.75, −1.5·1.1 = −1.65, −1.5·1.0 = −1.5  sum −5.7, mean −1.425
#   row 1, A = −0.5:  0.5·0.8* = 0.4,   0.5·1.5 = 0.75,   0.5·0.9 = 0.45                     sum  1.6, mean  8/15
#   row 2, A = −0.5:  0.5·1.0 = 0.5,    0.5·1.0 = 0.5                                        sum  1.0, mean  0.5
#   row 3, A = −0.5:  0.5·2.0 = 1.0,    0.5·0.8* = 0.4,   0.5·1.0 = 0.5,   0.5·1.0 = 0.5      sum  2.4, mean  0.6
# loss = (−1.425 + 8/15 + 0.5 + 0.6) / 4 · f = (5/24) / 4 · f = 5/96 · f;  clipfrac = 3 clipped / 13 tokens.
GOLDEN_CLIPPED = 5 / 96 * F
# With clip_high = 0.28 (DAPO's clip-higher) only row 0's first token changes: −1.5·1.28 = −1.92, so row 0's
# mean is −5.82/4 = −1.455 and loss = (−1.455 + 8/15 + 0.5 + 0.6) / 4 · f = (107/600) / 4 · f = 107/2400 · f.
GOLDEN_CLIP_HIGHER = 107 / 2400 * F


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("clip_high", "golden"), [(0.2, GOLDEN_CLIPPED), (0.28, GOLDEN_CLIP_HIGHER)],
                         ids=["symmetric", "clip-higher"])
def test_golden_clipped(backend, clip_high, golden):
    logp, behavior, advantages, mask = fixed_batch(RATIOS)
    cfg = AlgoConfig(clip_low=0.2, clip_high=clip_high, loss_agg="seq-mean-token-mean")
    loss, metrics = algo.get_policy_loss("ppo")(logp, behavior, advantages, mask, cfg, norm_length=4,
                                                 backend=backend)
    assert loss.item() == pytest.approx(golden, rel=1e-6)
    assert metrics["pg/clipfrac"].item() == pytest.approx(3 / 13, rel=1e-6)
    # ppo_kl = mean over the 13 tokens of −log r
    expected_kl = -sum(math.log(r) for row in RATIOS for r in row if r > 0) / 13
    assert metrics["pg/ppo_kl"].item() == pytest.approx(expected_kl, rel=1e-5)

    # dloss/dlogp = −A·r / (4 · n_b) on unclipped tokens, 0 on clipped and padded ones.
    loss.backward()
    expected = torch.zeros(4, 4)
    for b, row in enumerate(RATIOS):
        for t, r in enumerate(row[: LENGTHS[b]]):
            clipped = (ADVANTAGES[b] > 0 and r > 1 + clip_high) or (ADVANTAGES[b] < 0 and r < 0.8)
            expected[b, t] = 0.0 if clipped else -ADVANTAGES[b] * r / (4 * LENGTHS[b])
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[3, 1] == 0  # the three clipped tokens
    torch.testing.assert_close(logp.grad, expected, atol=1e-7, rtol=1e-5)
