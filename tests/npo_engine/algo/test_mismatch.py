"""Train/inference mismatch weights (algo.mismatch_weights) on hand values."""

import math

import pytest
import torch

from npo_engine import algo

# ρ = π_trainer / π_engine per token: row 0 = [1, 3, 0.25], row 1 = [0.6, 1.5, (masked)].
TRAINER = torch.log(torch.tensor([[0.5, 0.3, 0.05], [0.24, 0.6, 0.9]]))
ENGINE = torch.log(torch.tensor([[0.5, 0.1, 0.2], [0.4, 0.4, 0.1]]))
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_tis_caps_the_ratio():
    weights, sums = algo.mismatch_weights(TRAINER, ENGINE, MASK, "tis", 2.0)
    assert torch.allclose(weights, torch.tensor([[1.0, 2.0, 0.25], [0.6, 1.5, 1.0]]), atol=1e-6)
    assert sums["tokens"] == 5 and sums["corrected"] == 1  # only ρ = 3 is capped
    assert sums["abs_log_ratio"] == pytest.approx(abs(math.log(3)) + abs(math.log(0.25)) + abs(math.log(0.6))
                                                  + abs(math.log(1.5)), rel=1e-5)
    assert math.exp(sums["max_log_ratio"]) == pytest.approx(3.0, rel=1e-5)


def test_mask_drops_tokens_outside_the_band():
    weights, sums = algo.mismatch_weights(TRAINER, ENGINE, MASK, "mask", 2.0)
    # Kept: ρ in [0.5, 2]: 1, 0.6, 1.5; dropped: 3 and 0.25; the masked-out token keeps weight 1.
    assert weights.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert sums["corrected"] == 2


def test_none_only_measures():
    weights, sums = algo.mismatch_weights(TRAINER, ENGINE, MASK, "none", 2.0)
    assert torch.all(weights == 1) and sums["corrected"] == 0 and sums["tokens"] == 5
    with pytest.raises(ValueError, match="'none', 'tis', 'mask'"):
        algo.mismatch_weights(TRAINER, ENGINE, MASK, "clip", 2.0)


def test_sums_over_micro_batches_equal_the_sums_over_the_batch():
    whole = algo.mismatch_weights(TRAINER, ENGINE, MASK, "tis", 2.0)[1]
    total = algo.mismatch_sums_empty()
    for row in range(2):  # one row per micro-batch, in either order
        algo.add_mismatch_sums(total, algo.mismatch_weights(TRAINER[row:row + 1], ENGINE[row:row + 1],
                                                            MASK[row:row + 1], "tis", 2.0)[1])
    assert total == pytest.approx(whole, rel=1e-6)
    empty = algo.mismatch_sums_empty()
    algo.add_mismatch_sums(empty, algo.mismatch_weights(TRAINER, ENGINE, torch.zeros_like(MASK), "none", 2.0)[1])
    assert empty["tokens"] == 0 and empty["max_log_ratio"] == -math.inf  # no token: no largest ratio
