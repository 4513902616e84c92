"""Which rows of a mini-batch need a backward, and the micro-batches that cover them.

A row whose advantages are zero on every scored token contributes exactly zero to the policy gradient: every
loss the trainer runs is -A·(a function of the ratio) per token (PPO clip, dual clip, the guide shapings), and
the mismatch and decoupled weights multiply A. Such rows (all-right and all-wrong GRPO groups) are still scored,
without gradient, so that entropy, clip and ratio metrics and each row's entropy stay what they were; they only
skip the backward, about two thirds of their cost. With a KL penalty every row has a gradient and none is
skipped (the trainer's choice, not this module's).

Under FSDP every rank must run the same number of forwards with and without gradient (each forward gathers
the shards, each backward reduces the gradients): the counts are agreed on by the caller (a max over ranks),
and a rank with fewer real micro-batches runs padding ones: row 0 at loss weight 0, not counted in metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """rows: [n] int64 indices into the mini-batch; grad: run the backward; counted: a real micro-batch (its
    loss weight and metrics count) rather than padding."""

    rows: torch.Tensor
    grad: bool
    counted: bool = True


def rows_with_gradient(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows with a nonzero advantage on at least one scored token.

    Args:
        advantages: [B] or [B, T]; mask: [B, T] bool, the scored tokens.
    """
    if advantages.dim() == 1:
        return (advantages != 0) & mask.any(dim=1)
    return ((advantages != 0) & mask).any(dim=1)


def count_micro_batches(trainable: torch.Tensor, size: int) -> tuple[int, int]:
    """(micro-batches with gradient, without) that `plan_micro_batches` needs for these rows before padding."""
    with_grad = int(trainable.sum())
    return -(-with_grad // size), -(-(trainable.numel() - with_grad) // size)


def plan_micro_batches(trainable: torch.Tensor, size: int, *, grad_batches: int,
                       free_batches: int) -> list[MicroBatch]:
    """Micro-batches of at most `size` rows: the rows without gradient first, then the trainable ones, each in
    order, padded to exactly `free_batches` and `grad_batches` (counts agreed on across ranks, each at least this
    rank's own, see `count_micro_batches`).

    A backward comes last: under FSDP2 the root module's parameters stay unsharded after a forward until its
    backward, so a trailing forward without one would leave them swapped out when the gradients are clipped.

    Args:
        trainable: [B] bool (`rows_with_gradient`, or all True to train every row).
    """
    own_grad, own_free = count_micro_batches(trainable, size)
    if grad_batches < own_grad or free_batches < own_free:
        raise ValueError(f"plan_micro_batches: {own_grad} + {own_free} micro-batches needed, "
                         f"{grad_batches} + {free_batches} allowed")
    index = torch.arange(trainable.numel(), device=trainable.device)
    plan = [MicroBatch(rows, grad=False) for rows in _chunks(index[~trainable], size)]
    plan += [MicroBatch(index[:1], grad=False, counted=False)] * (free_batches - own_free)
    plan += [MicroBatch(rows, grad=True) for rows in _chunks(index[trainable], size)]
    plan += [MicroBatch(index[:1], grad=True, counted=False)] * (grad_batches - own_grad)
    return plan


def _chunks(rows: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    return rows.split(size) if rows.numel() else ()  # split() of an empty tensor gives one empty chunk
