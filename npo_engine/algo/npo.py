"""NPO's pure parts (npo_method.md §5, §8): which groups get a guide slot, and the guide slot's ratio.

Tensors and numbers in, tensors out; the guide cache, the engines and the rollbacks live in `npo_engine.guides`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

GuideIS = Literal["exact", "none", "decoupled", "luffy", "exgrpo"]

# k/n is compared with the gate as k <= gate·n: a gate of 0.6 at n = 8 admits k <= 4.8, i.e. 4 correct, and
# the slack absorbs the rounding of gate·n (0.6·5 = 3.0000000000000004) without admitting k = gate·n + 1.
_GATE_SLACK = 1e-9


def gate_groups(correct: torch.Tensor, has_entry: torch.Tensor, gate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The NPO gate over the on-policy samples of each group, before any slot is replaced.

    Args:
        correct: [G, n] bool (or 0/1), whether each of the n on-policy samples of a group is correct.
        has_entry: [G] bool, whether the guide cache holds a verified trajectory for the group's prompt.
        gate: the threshold τ; inclusive (p̂ ≤ τ injects).

    Returns:
        p_hat [G] fp64, the on-policy accuracy over all n samples (the slot to be replaced included), and
        inject [G] bool = p̂ ≤ τ and an entry exists.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be [G, n], got shape {tuple(correct.shape)}")
    if has_entry.shape != correct.shape[:1]:
        raise ValueError(f"has_entry must be [G] = [{correct.shape[0]}], got shape {tuple(has_entry.shape)}")
    n = correct.shape[1]
    p_hat = correct.to(torch.float64).sum(1) / n
    inject = passes_gate(p_hat, n, gate) & has_entry.to(torch.bool)
    return p_hat, inject


def passes_gate(p_hat: torch.Tensor, group_size: int, gate: float) -> torch.Tensor:
    """[G] bool: p̂ ≤ τ, inclusive, compared as correct counts k = p̂·n against τ·n (see `_GATE_SLACK`)."""
    return p_hat * group_size <= gate * group_size + _GATE_SLACK


def guide_slot(group_size: int) -> int:
    """The slot a guide trajectory replaces: the last one. The n samples are iid, so this is a random slot,
    and p̂ was taken over all n first: an incorrect sample is never preferred (npo_method.md §5)."""
    return group_size - 1


def decoupled_weights(old_logp: torch.Tensor, guide_logp: torch.Tensor, mask: torch.Tensor,
                      cap: float) -> torch.Tensor:
    """Per-token weight min(π_old / π_guide, C) of guide_is = "decoupled" (zero outside the mask).

    The decoupled-PPO form: the PPO clip acts on π_θ / π_old as for on-policy tokens, and this truncated weight
    corrects for the guide having produced the tokens, so a far guide cannot blow up the update.

    Args:
        old_logp, guide_logp, mask: [B, T]; log-probs of the same tokens under π_old and the guide.
        cap: C >= 1.
    """
    mask = mask.to(torch.bool)
    # Clamping the log-weight at log C before exp() is exact (min(e^x, C) = e^min(x, log C)) and cannot overflow.
    log_w = torch.where(mask, old_logp - guide_logp, torch.zeros_like(old_logp)).clamp(max=math.log(cap))
    return torch.where(mask, torch.exp(log_w), torch.zeros_like(old_logp))


def needs_old_logp(guide_is: GuideIS) -> bool:
    """Whether guide rows need π_old recomputed on their tokens (the ratio's denominator or the IS weight)."""
    return guide_is in ("none", "decoupled")


def guide_transform(guide_is: GuideIS) -> str:
    """The loss form of guide tokens for a weighting: LUFFY's and ExGRPO's shaped weights, else the PPO clip
    (on π_θ / π_guide for `exact`, on π_θ / π_old for `none` and `decoupled`)."""
    return guide_is if guide_is in ("luffy", "exgrpo") else "ppo"
