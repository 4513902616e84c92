"""The CPU path of `group_advantages`: the reference's statistics (reference.py) in as few tensor operations
as the simplest vectorized PyTorch needs (`torch.unique` + `index_add_` for counts, sums and squared
deviations), or fewer; on tensors of a few thousand elements each operation's dispatch costs more than its
arithmetic, so the op count is the cost.

- **Dense group index.** Group ids within a span of at most 2·B values (the trainer's 0..G-1, at any offset)
  index the statistics directly (`id - min`; ids absent from the span are empty groups that nobody reads),
  which skips `torch.unique`, the most expensive operation here (a sort). Wider spans (strided, hashed or
  global ids) try the low bits: slot = id mod 2^k, 2^k >= 2·B, kept when no two distinct ids share a slot
  (checked exactly: write each id into its slot, then every id must read back its own), which holds for ids
  on any odd stride and for most others; otherwise `torch.unique(return_inverse=True)`, as the simple
  version does.
- **fp64 statistics instead of the reference's shift.** Sums of up to 2^29 fp32 rewards are exact in fp64, so a
  group of equal rewards has mean == reward exactly (centered exactly 0, as the reference's shift by the group
  max guarantees) without the extra `scatter_reduce`; counts and sums are one `bincount` each. Two passes as in
  the reference: Σ(r − mean)² around the mean just computed, never Σr² − (Σr)²/n.
- **GRPO and Dr. GRPO with `stats="all"`** (the common case) scale each group once (`[G]`) and gather one
  factor per member; other modes and `stats="on_policy"` build the reference's `MemberStats` and use its
  formulas (`ADVANTAGE_MODES`).
"""

from __future__ import annotations

import torch

from .reference import ADVANTAGE_MODES, MemberStats, feeding_members

# Ids spanning at most this many values per sample index the statistics directly (arrays of span entries);
# wider spans try at least this many hash slots per sample (a power of two).
_MAX_SPAN_PER_SAMPLE = 2


def dense_group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B] int64 index in [0, G) with equal ids mapped to equal indices, and G (an upper bound on the number of
    groups when ids are taken directly from a narrow span). B >= 1, CPU tensor."""
    lo, hi = (int(v) for v in torch.aminmax(group_ids))
    span = hi - lo + 1
    if span <= _MAX_SPAN_PER_SAMPLE * group_ids.numel():
        return group_ids.to(torch.int64) - lo, span
    slots = 1 << (_MAX_SPAN_PER_SAMPLE * group_ids.numel() - 1).bit_length()
    ids = group_ids.to(torch.int64)
    index = ids & (slots - 1)  # id mod 2^k, negative ids included (two's complement)
    # Any one writer per slot wins; if a slot had two distinct ids, the loser would not read its own back.
    written = torch.empty(slots, dtype=torch.int64).scatter_(0, index, ids)
    if torch.equal(written.index_select(0, index), ids):
        return index, slots
    distinct, index = torch.unique(group_ids, return_inverse=True)
    return index, distinct.numel()


def group_advantages_cpu(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: str, eps: float,
                         policy_id: torch.Tensor | None, stats: str) -> torch.Tensor:
    """Same contract as reference.group_advantages_ref, for CPU tensors: [B] fp32."""
    if rewards.numel() == 0:
        return torch.empty(0, dtype=torch.float32)
    r = rewards.to(torch.float64)
    index, num_groups = dense_group_index(group_ids)
    every_member_feeds = stats == "all" or policy_id is None
    if every_member_feeds:
        n = torch.bincount(index, minlength=num_groups).to(torch.float64)  # [G]
        sums = torch.bincount(index, weights=r, minlength=num_groups)
    else:
        feeds = feeding_members(index, num_groups, policy_id, stats).to(torch.float64)
        n = torch.bincount(index, weights=feeds, minlength=num_groups)
        sums = torch.bincount(index, weights=feeds * r, minlength=num_groups)
    # Empty groups (ids absent from a narrow span) give 0/0 here; no member reads them.
    centered = r - (sums / n).index_select(0, index)
    squares = centered * centered if every_member_feeds else feeds * centered * centered
    variance = torch.bincount(index, weights=squares, minlength=num_groups) / (n - 1)  # [G]; n < 2: not used
    if every_member_feeds and mode in ("grpo", "drgrpo"):
        if mode == "drgrpo":
            return centered.to(torch.float32)
        # grpo: 1 / (std + eps), or 1 when fewer than 2 members feed the std (reference.grpo_advantage).
        scale = torch.where(n >= 2, 1.0 / (variance.sqrt() + eps), 1.0)
        return (centered * scale.index_select(0, index)).to(torch.float32)
    std = torch.where(n >= 2, variance.sqrt(), 0.0)
    member = MemberStats(centered=centered, std=std.index_select(0, index), n=n.index_select(0, index),
                         feeds=torch.ones_like(r) if every_member_feeds else feeds)
    return ADVANTAGE_MODES[mode](member, eps).to(torch.float32)
