"""Group-relative advantages in vectorized PyTorch: the readable spec, and the CPU path of `group_advantages`.

Every group's statistics come from one `torch.unique(return_inverse=True)` and a few `index_add_`s; there is
no Python loop over samples or groups (verl's and LUFFY's dict-of-lists loop is the benchmark baseline).

Numerics (reference/kernels.md §1.3):
- Two passes: the group mean first, then Σ(r − mean)² (never Σr² − (Σr)²/n, which cancels for non-binary
  rewards).
- The mean is taken around a shift, one of the group's own rewards (its max), so a group of equal rewards has
  mean == reward exactly and gets advantage exactly 0, not rounding noise divided by eps.
- Unbiased (Bessel) std and eps = 1e-6; a group of one gets 0.

Which members feed the statistics (`stats`):
- "all": every member of the group.
- "on_policy": only members with `policy_id == ON_POLICY` (LUFFY's grpo_split), and the resulting mean/std are
  applied to every member, guide members included. A group with no on-policy member falls back to all members.
  When fewer than 2 members feed the statistics the std is undefined, so "grpo" scales by 1 (the "drgrpo"
  result, r − mean) instead of dividing by eps.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch

# The policy_id values (ON_POLICY = 0, GUIDE = 1), shared by the ops.
from .._dispatch import GUIDE, ON_POLICY  # noqa: F401  (GUIDE: importable from here)

AdvantageMode = Literal["grpo", "drgrpo", "rloo"]
StatsMode = Literal["all", "on_policy"]
STATS_MODES: tuple[str, ...] = ("all", "on_policy")


class MemberStats(NamedTuple):
    """The statistics of each member's group, gathered back to the members; all [B] fp32."""

    centered: torch.Tensor  # r − mean of the feeding members
    std: torch.Tensor  # unbiased std of the feeding members (0 when fewer than 2 feed)
    n: torch.Tensor  # number of feeding members in the group
    feeds: torch.Tensor  # 1.0 where this member feeds its group's statistics, else 0.0


def grpo_advantage(s: MemberStats, eps: float) -> torch.Tensor:
    """GRPO (DeepSeekMath): (r − mean) / (std + eps); scale 1 when fewer than 2 members feed the std."""
    return torch.where(s.n >= 2, s.centered / (s.std + eps), s.centered)


def drgrpo_advantage(s: MemberStats, eps: float) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r − mean, no std normalization (it biases toward easy/hard prompts)."""
    return s.centered


def rloo_advantage(s: MemberStats, eps: float) -> torch.Tensor:
    """RLOO: r_i − mean of the OTHER feeding members of the group; 0 when there is no other member.

    With S = Σ_feeders r and f_i = 1 if i feeds: baseline_i = (S − f_i r_i) / (n − f_i), so
    r_i − baseline_i = (r_i − mean) · n / (n − f_i). A guide member under stats="on_policy" (f_i = 0) is
    compared with the mean of all on-policy members.
    """
    others = s.n - s.feeds
    return torch.where(others > 0, s.centered * s.n / others.clamp(min=1), torch.zeros_like(s.centered))


ADVANTAGE_MODES: dict[str, Callable[[MemberStats, float], torch.Tensor]] = {
    "grpo": grpo_advantage,
    "drgrpo": drgrpo_advantage,
    "rloo": rloo_advantage,
}


def feeding_members(group_index: torch.Tensor, num_groups: int, policy_id: torch.Tensor | None,
                    stats: str) -> torch.Tensor:
    """Which members feed their group's statistics: [B] bool.

    Args:
        group_index: [B] int64 in [0, num_groups), dense group index of each member.
        policy_id: [B] int or None (None: every member is on-policy).
    """
    if stats == "all" or policy_id is None:
        return torch.ones_like(group_index, dtype=torch.bool)
    on_policy = policy_id == ON_POLICY
    on_policy_count = torch.zeros(num_groups, dtype=torch.int64, device=group_index.device)
    on_policy_count.index_add_(0, group_index, on_policy.long())
    # A group without on-policy members would have no statistics at all: fall back to all of its members.
    return on_policy | (on_policy_count.index_select(0, group_index) == 0)


def member_stats(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int,
                 feeds: torch.Tensor) -> MemberStats:
    """Two-pass, shifted group statistics of the feeding members, gathered back to every member.

    Args:
        rewards: [B] fp32.  group_index: [B] int64 in [0, num_groups).  feeds: [B] bool.
    """
    zeros = rewards.new_zeros(num_groups)
    f = feeds.to(rewards.dtype)
    n = zeros.index_add(0, group_index, f)
    # Shift by a member's own reward so equal rewards give an exactly-zero centered value (module docstring).
    shift = zeros.scatter_reduce(0, group_index, torch.where(feeds, rewards, -torch.inf), "amax",
                                 include_self=False)
    shifted = f * (rewards - shift.index_select(0, group_index))
    mean = shift + zeros.index_add(0, group_index, shifted) / n.clamp(min=1)
    centered = rewards - mean.index_select(0, group_index)
    # Second pass: squared deviations around the mean just computed (never Σr² − (Σr)²/n).
    sq_dev = zeros.index_add(0, group_index, f * centered * centered)
    std = torch.where(n >= 2, (sq_dev / (n - 1).clamp(min=1)).sqrt(), zeros)
    # index_select, not std[group_index]: the same gather with a fraction of advanced indexing's overhead.
    gather = lambda x: x.index_select(0, group_index)  # noqa: E731
    return MemberStats(centered=centered, std=gather(std), n=gather(n), feeds=f)


def group_advantages_ref(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: str, eps: float,
                         policy_id: torch.Tensor | None, stats: str) -> torch.Tensor:
    """Group-relative advantages, [B] fp32. Arguments (and their defaults) are those of
    `npo_kernels.group_advantages`, which checks them; call that with backend="torch" to run this.

    Args:
        rewards: [B] float.  group_ids: [B] int, any order, any values.  policy_id: [B] int or None.
    """
    rewards = rewards.to(torch.float32)
    unique_ids, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = unique_ids.numel()
    feeds = feeding_members(group_index, num_groups, policy_id, stats)
    return ADVANTAGE_MODES[mode](member_stats(rewards, group_index, num_groups, feeds), eps)
