"""Triton kernel for group advantages: one launch, one program per group, groups made contiguous by a sort.

Preparation in torch (a handful of small, fixed-size ops; no host sync, unlike `torch.unique`):
    sorted_ids, order = sort(group_ids)            members of a group become one contiguous segment
    seg = cumsum(sorted_ids[i] != sorted_ids[i-1]) dense group index of each sorted position
    count[g], start[g]                             segment sizes (index_add) and starts (cumsum); [B] each,
                                                   zero-sized past the number of groups
Then one kernel launch over B programs on CUDA (an upper bound on the number of groups, known without a
sync; on CPU, under the interpreter, exactly one program per group):
program g walks its segment in BLOCK-sized pieces (a no-op when count[g] == 0), reads each member through
`order` (a data-dependent offset, which the interpreter supports), and makes the same passes as reference.py:
    1. feeder count and max (the shift)   2. shifted sum -> mean   3. Σ(r − mean)² -> unbiased std
    4. advantage of every member, written back to its original position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ADVANTAGE_MODES

# Kernel codes of the reference's advantage modes (the `MODE` constexpr).
_MODE_CODE = {"grpo": 0, "drgrpo": 1, "rloo": 2}
assert set(_MODE_CODE) == set(ADVANTAGE_MODES), "an advantage mode has no Triton code"

# Members per loop step: one step covers the usual GRPO group (8–64); larger groups loop.
_BLOCK = 32


@triton.jit
def _load_members(REWARDS, POLICY_ID, ORDER, off, end, ON_POLICY_STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The BLOCK members at sorted positions off, off + 1, ... (< end): original index, reward (fp32), and
    the in-segment and on-policy flags."""
    pos = off + tl.arange(0, BLOCK)
    valid = pos < end
    idx = tl.load(ORDER + pos, mask=valid, other=0)
    r = tl.load(REWARDS + idx, mask=valid, other=0.0).to(tl.float32)
    if ON_POLICY_STATS:
        on_policy = valid & (tl.load(POLICY_ID + idx, mask=valid, other=1) == 0)
    else:
        on_policy = valid
    return idx, r, valid, on_policy


@triton.jit
def _group_advantages_kernel(
    REWARDS, POLICY_ID,  # [B] float, [B] int (read only when ON_POLICY_STATS)
    ORDER, STARTS, COUNTS,  # [B] int64: sorted-to-original index, segment start and size per group
    OUT,  # [B] fp32
    EPS: tl.constexpr, MODE: tl.constexpr, ON_POLICY_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(STARTS + group)
    end = start + tl.load(COUNTS + group)

    # Pass 1: who feeds the statistics, how many, and the shift (max of the feeders). Block-wide
    # accumulators reduced after the loop keep the loop-carried types fixed.
    acc_n_all = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n_on = tl.zeros([BLOCK], dtype=tl.float32)
    acc_max_all = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    acc_max_on = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx, r, valid, on_policy = _load_members(REWARDS, POLICY_ID, ORDER, off, end, ON_POLICY_STATS, BLOCK)
        acc_n_all += tl.where(valid, 1.0, 0.0)
        acc_n_on += tl.where(on_policy, 1.0, 0.0)
        acc_max_all = tl.maximum(acc_max_all, tl.where(valid, r, float("-inf")))
        acc_max_on = tl.maximum(acc_max_on, tl.where(on_policy, r, float("-inf")))
    n_on = tl.sum(acc_n_on, axis=0)
    # A group without on-policy members falls back to all members (reference.feeding_members).
    all_feed = n_on == 0.0
    n = tl.where(all_feed, tl.sum(acc_n_all, axis=0), n_on)
    shift = tl.where(all_feed, tl.max(acc_max_all, axis=0), tl.max(acc_max_on, axis=0))

    # Pass 2: mean = shift + Σ(r − shift)/n; equal rewards give mean == shift exactly.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx, r, valid, on_policy = _load_members(REWARDS, POLICY_ID, ORDER, off, end, ON_POLICY_STATS, BLOCK)
        feeds = tl.where(all_feed, valid, on_policy)
        acc += tl.where(feeds, r - shift, 0.0)
    mean = shift + tl.sum(acc, axis=0) / tl.maximum(n, 1.0)

    # Pass 3: unbiased variance around that mean (two-pass, never Σr² − (Σr)²/n).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx, r, valid, on_policy = _load_members(REWARDS, POLICY_ID, ORDER, off, end, ON_POLICY_STATS, BLOCK)
        feeds = tl.where(all_feed, valid, on_policy)
        centered = r - mean
        acc += tl.where(feeds, centered * centered, 0.0)
    std = tl.where(n >= 2.0, tl.sqrt(tl.sum(acc, axis=0) / tl.maximum(n - 1.0, 1.0)), 0.0)

    # Pass 4: the advantage of every member (reference.ADVANTAGE_MODES), stored at its original index.
    for off in range(start, end, BLOCK):
        idx, r, valid, on_policy = _load_members(REWARDS, POLICY_ID, ORDER, off, end, ON_POLICY_STATS, BLOCK)
        feeds = tl.where(all_feed, valid, on_policy)
        centered = r - mean
        if MODE == 0:  # grpo: scale 1 when fewer than 2 members feed the std
            adv = tl.where(n >= 2.0, centered / (std + EPS), centered)
        elif MODE == 1:  # drgrpo
            adv = centered
        else:  # rloo: (r − mean) · n / (n − f), 0 with no other feeding member
            others = n - tl.where(feeds, 1.0, 0.0)
            adv = tl.where(others > 0.0, centered * n / tl.maximum(others, 1.0), 0.0)
        tl.store(OUT + idx, adv, mask=valid)


def group_advantages_triton(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: str, eps: float,
                            policy_id: torch.Tensor | None, stats: str) -> torch.Tensor:
    """Same contract as reference.group_advantages_ref; rewards, group_ids, policy_id [B] on one device."""
    num = rewards.numel()
    out = torch.empty(num, dtype=torch.float32, device=rewards.device)
    if num == 0:
        return out
    sorted_ids, order = torch.sort(group_ids, stable=True)
    is_start = torch.ones(num, dtype=torch.bool, device=rewards.device)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    seg = torch.cumsum(is_start, 0) - 1  # [B] dense group index, in sorted order
    counts = torch.zeros(num, dtype=torch.int64, device=rewards.device).index_add_(
        0, seg, torch.ones_like(seg))
    starts = torch.cumsum(counts, 0) - counts
    on_policy_stats = stats == "on_policy" and policy_id is not None
    # On CUDA launch B programs (programs past the last group see count 0 and do nothing), so the number of
    # groups never has to reach the host. On CPU (the interpreter) reading it is free, and idle programs
    # are not: the interpreter pays milliseconds per program.
    num_programs = num if rewards.is_cuda else int(seg[-1]) + 1
    _group_advantages_kernel[(num_programs,)](
        rewards.contiguous(),
        policy_id.contiguous() if on_policy_stats else rewards,  # not read without on-policy statistics
        order, starts, counts, out,
        EPS=float(eps), MODE=_MODE_CODE[mode], ON_POLICY_STATS=on_policy_stats, BLOCK=_BLOCK,
    )
    return out
