"""Which rows need a backward, and micro-batch plans that cover every row once with agreed counts."""

import pytest
import torch

from npo_engine.algo import count_micro_batches, plan_micro_batches, rows_with_gradient


def test_rows_with_gradient_per_row_and_per_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    per_row = torch.tensor([0.5, 0.0, 1.0, -0.25])
    # row 2 scores no token: nothing to train even with an advantage
    assert rows_with_gradient(per_row, mask).tolist() == [True, False, False, True]
    per_token = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 1e-30], [1.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    # a nonzero weight outside the mask does not count; a tiny one inside does
    assert rows_with_gradient(per_token, mask).tolist() == [False, True, False, False]


def _covered(plan):
    rows = [r for mb in plan if mb.counted for r in mb.rows.tolist()]
    return sorted(rows), rows


def test_plan_covers_every_row_once_and_trains_only_the_trainable():
    trainable = torch.tensor([True, False, True, True, False, False, True])
    plan = plan_micro_batches(trainable, 2, grad_batches=2, free_batches=2)
    assert _covered(plan)[0] == list(range(7))
    assert [mb.rows.tolist() for mb in plan if mb.grad] == [[0, 2], [3, 6]]
    assert [mb.rows.tolist() for mb in plan if not mb.grad] == [[1, 4], [5]]
    assert all(mb.counted for mb in plan)
    assert all(len(mb.rows) <= 2 for mb in plan)


def test_all_trainable_is_the_contiguous_split():
    plan = plan_micro_batches(torch.ones(5, dtype=torch.bool), 2, grad_batches=3, free_batches=0)
    assert [mb.rows.tolist() for mb in plan] == [[0, 1], [2, 3], [4]]
    assert all(mb.grad and mb.counted for mb in plan)


def test_padding_reaches_the_agreed_counts_and_is_not_counted():
    trainable = torch.tensor([False, False, True, False])
    assert count_micro_batches(trainable, 2) == (1, 2)
    plan = plan_micro_batches(trainable, 2, grad_batches=3, free_batches=4)
    assert [mb.grad for mb in plan] == [False] * 4 + [True] * 3  # the backwards last
    assert sum(mb.counted for mb in plan) == 3  # one with gradient, two without; the rest pad
    assert all(mb.rows.tolist() == [0] for mb in plan if not mb.counted)
    assert _covered(plan)[0] == [0, 1, 2, 3]


def test_no_trainable_row_gives_no_backward_of_its_own():
    trainable = torch.zeros(3, dtype=torch.bool)
    assert count_micro_batches(trainable, 8) == (0, 1)
    plan = plan_micro_batches(trainable, 8, grad_batches=1, free_batches=1)
    assert [(mb.grad, mb.counted) for mb in plan] == [(False, True), (True, False)]


def test_counts_below_this_ranks_own_are_an_error():
    with pytest.raises(ValueError, match="micro-batches needed"):
        plan_micro_batches(torch.ones(4, dtype=torch.bool), 2, grad_batches=1, free_batches=0)
