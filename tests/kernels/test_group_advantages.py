"""group_advantages: the vectorized reference and the Triton kernel against float64 loops over a dict of
groups written out here.

Bounds: `npo_kernels.testing.group_advantage_budget` per group (the rounding-error analysis is written there:
u, the group size k, Σ|r − shift|, the std), via `advantage_budget` below; hand-worked values of a few
operations use the elementwise table (`assert_close`).

Grid rationale: every mode × stats × policy_id None / mixed, on batches with singleton groups, a group larger
than the kernel's 32-member block (so its loop runs twice), non-contiguous ids (7, 1000003, −5) in shuffled
order, and guide-only groups. Batches stay small: the kernel runs in the Triton interpreter on CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import itertools
import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npo_kernels.advantages.op import group_advantages as _group_advantages
from npo_kernels.advantages.reference import ADVANTAGE_MODES
from npo_kernels.testing import assert_close, assert_within, group_advantage_budget

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

MODES = list(ADVANTAGE_MODES)
STATS = ["all", "on_policy"]
BACKENDS = ["torch", "triton"]


def group_advantages(rewards, group_ids, *, backend="auto", policy_id=None, **kwargs):
    """The op as these tests call it: CPU tensors in and out; backend="triton" runs on CUDA copies when there
    is a GPU (CPU tensors reach the kernel only under the interpreter)."""
    if backend == "triton" and HAS_CUDA:
        policy_id = None if policy_id is None else policy_id.cuda()
        return _group_advantages(rewards.cuda(), group_ids.cuda(), backend=backend, policy_id=policy_id,
                                 **kwargs).cpu()
    return _group_advantages(rewards, group_ids, backend=backend, policy_id=policy_id, **kwargs)


# ---- Independent float64 formulas: a dict of groups and a loop per sample ----------------------------------

def naive_advantages(rewards, group_ids, *, mode="grpo", eps=1e-6, policy_id=None, stats="all"):
    """The spec, sample by sample in Python floats."""
    members = defaultdict(list)
    for i, g in enumerate(group_ids.tolist()):
        members[g].append(i)
    r = [float(x) for x in rewards.tolist()]
    on_policy = [True] * len(r) if policy_id is None else [p == 0 for p in policy_id.tolist()]
    out = [0.0] * len(r)
    for idx in members.values():
        feeders = [i for i in idx if on_policy[i]] if stats == "on_policy" else list(idx)
        feeders = feeders or list(idx)  # no on-policy member: all members feed
        n = len(feeders)
        mean = sum(r[i] for i in feeders) / n
        std = math.sqrt(sum((r[i] - mean) ** 2 for i in feeders) / (n - 1)) if n >= 2 else None
        for i in idx:
            if mode == "grpo":
                out[i] = (r[i] - mean) / (std + eps) if std is not None else r[i] - mean
            elif mode == "drgrpo":
                out[i] = r[i] - mean
            else:  # rloo: the mean of the OTHER feeding members
                others = [r[j] for j in feeders if j != i]
                out[i] = r[i] - sum(others) / len(others) if others else 0.0
    return torch.tensor(out, dtype=torch.float64)


def advantage_budget(rewards, group_ids, *, mode="grpo", eps=1e-6, policy_id=None, stats="all"):
    """[B] error budget of each member's fp32 advantage, group by group (feeders as in the loops above)."""
    rewards = rewards.double()
    on_policy = torch.ones_like(group_ids, dtype=torch.bool) if policy_id is None else policy_id == 0
    bound = torch.zeros(len(rewards), dtype=torch.float64)
    for g in group_ids.unique():
        members = (group_ids == g).nonzero().squeeze(1)
        feeds = on_policy[members] if stats == "on_policy" else torch.ones(len(members), dtype=torch.bool)
        bound[members] = group_advantage_budget(rewards[members], feeds, mode, eps)
    return bound


def assert_advantages(name, rewards, group_ids, got, **kwargs):
    """`got` within the budget of the float64 loops' advantages."""
    assert_within(name, naive_advantages(rewards, group_ids, **kwargs), got,
                  advantage_budget(rewards, group_ids, **kwargs))


def make_batch(seed=0, binary=False):
    """26 samples, shuffled: groups of 1 (×2), 3, 4 (guide-only), 2, and one of 15; ids far apart."""
    g = torch.Generator().manual_seed(seed)
    sizes = {7: 1, 1000003: 3, -5: 4, 42: 1, 3: 2, 99: 15}
    group_ids = torch.tensor([gid for gid, n in sizes.items() for _ in range(n)])
    policy_id = (torch.rand(len(group_ids), generator=g) < 0.3).long()
    policy_id[group_ids == -5] = 1  # a guide-only group: statistics fall back to all members
    rewards = (torch.randint(0, 2, (len(group_ids),), generator=g).float() if binary
               else torch.randn(len(group_ids), generator=g))
    perm = torch.randperm(len(group_ids), generator=g)
    return rewards[perm], group_ids[perm], policy_id[perm]


# ---- Reference against the loops ---------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True], ids=["gaussian", "binary"])
@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_loops(mode, stats, binary):
    rewards, group_ids, policy_id = make_batch(binary=binary)
    for pid in (None, policy_id):
        got = group_advantages(rewards, group_ids, mode=mode, policy_id=pid, stats=stats, backend="torch")
        assert got.dtype == torch.float32
        assert_advantages(f"adv[{mode},{stats}]", rewards, group_ids, got, mode=mode, policy_id=pid,
                          stats=stats)


# ---- Triton against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("with_policy_id", [False, True], ids=["pid-none", "pid-mixed"])
@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_matches_reference(mode, stats, with_policy_id):
    rewards, group_ids, policy_id = make_batch(seed=1)
    kwargs = dict(mode=mode, stats=stats, policy_id=policy_id if with_policy_id else None)
    got = group_advantages(rewards, group_ids, backend="triton", **kwargs)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    assert_advantages(f"adv[{mode},{stats}]", rewards, group_ids, got, **kwargs)


def test_triton_group_larger_than_block():
    """One group of 70 (three 32-member steps of the kernel loop) and a singleton."""
    rewards = torch.randn(71, generator=torch.Generator().manual_seed(2))
    group_ids = torch.tensor([5] * 70 + [6])
    for mode in MODES:
        got = group_advantages(rewards, group_ids, mode=mode, backend="triton")
        assert_advantages(mode, rewards, group_ids, got, mode=mode)


# ---- Hand-made cases, both backends ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_singletons_and_equal_rewards_give_exactly_zero(backend, mode):
    """Singleton groups and groups of equal (non-representable) rewards give exactly 0, not noise / eps."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, -2.0])
    group_ids = torch.tensor([1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 4])
    got = group_advantages(rewards, group_ids, mode=mode, backend=backend)
    assert (got == 0).all(), got


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_stats_rules(backend):
    """Group 0: one on-policy member (reward 1) and two guides. grpo scales by 1 (fewer than 2 feed the std);
    rloo gives the lone on-policy member 0 and compares the guides with it.
    Group 1: guide-only, so all members feed: rewards 0, 2 -> mean 1, std √2."""
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    policy_id = torch.tensor([0, 1, 1, 1, 1])
    kwargs = dict(policy_id=policy_id, stats="on_policy", backend=backend)
    s2 = math.sqrt(2.0) + 1e-6
    assert_close("grpo", torch.tensor([0.0, 2.0, -1.0, -1 / s2, 1 / s2]),
                 group_advantages(rewards, group_ids, mode="grpo", **kwargs))
    assert_close("rloo", torch.tensor([0.0, 2.0, -1.0, -2.0, 2.0]),
                 group_advantages(rewards, group_ids, mode="rloo", **kwargs))
    assert_close("drgrpo", torch.tensor([0.0, 2.0, -1.0, -1.0, 1.0]),
                 group_advantages(rewards, group_ids, mode="drgrpo", **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_ids_permute_the_output(backend):
    rewards, group_ids, policy_id = make_batch(seed=3)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(4))
    kwargs = dict(mode="rloo", policy_id=policy_id, stats="on_policy", backend=backend)
    base = group_advantages(rewards, group_ids, **kwargs)
    shuffled = group_advantages(rewards[perm], group_ids[perm], policy_id=policy_id[perm],
                                **{k: v for k, v in kwargs.items() if k != "policy_id"})
    # The same exact advantages in another order: each within its budget of the loops' values.
    budget_kwargs = dict(mode="rloo", policy_id=policy_id, stats="on_policy")
    assert_advantages("base", rewards, group_ids, base, **budget_kwargs)
    assert_advantages("permuted", rewards[perm], group_ids[perm], shuffled,
                      **{**budget_kwargs, "policy_id": policy_id[perm]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_is_two_pass_accurate(backend):
    """Rewards 100 + 0.1·noise: in fp32 a one-pass Σr² − (Σr)²/n gets this variance 16 % wrong (0.0089 vs
    0.0107 for the first group); two passes keep it to rounding."""
    g = torch.Generator().manual_seed(5)
    rewards = 100.0 + 0.1 * torch.randn(16, generator=g)
    group_ids = torch.arange(16) // 8
    # The budget is u·|mean| ≈ 6e-6 on each centred value, against a 0.1 spread: ~1e-4 of the advantage.
    assert_advantages("grpo", rewards, group_ids, group_advantages(rewards, group_ids, backend=backend))


def test_dtypes_and_empty_batch():
    group_ids = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    for dtype in (torch.float64, torch.float16):
        rewards = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=dtype)
        for backend in BACKENDS:
            adv = group_advantages(rewards, group_ids, backend=backend)
            assert adv.dtype == torch.float32
            h = 0.5 / (math.sqrt(0.5) + 1e-6)  # (r − mean) / (unbiased std + eps)
            assert_close("adv", torch.tensor([h, -h, 0.0, 0.0]), adv, torch.float32)
    for backend in BACKENDS:
        empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), backend=backend)
        assert empty.shape == (0,)


@pytest.mark.parametrize(("kwargs", "names"), [
    (dict(mode="ppo"), ["mode", "'ppo'", "grpo"]),
    (dict(stats="guide"), ["stats", "on_policy"]),
    (dict(backend="cuda"), ["backend", "triton"]),
    (dict(eps=-1.0), ["eps"]),
])
def test_invalid_arguments_raise(kwargs, names):
    with pytest.raises(ValueError) as err:
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), **kwargs)
    for name in names:
        assert name in str(err.value)


def test_bad_shapes_name_the_tensor():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="policy_id"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), policy_id=torch.zeros(3))


# ---- Properties --------------------------------------------------------------------------------------------

# Rewards on a grid of quarters, as real rewards mostly are (0/1, partial credit): distinct rewards in a group
# differ by ≥ 0.25, so its std is far above eps and fp32 rounding stays at the ulp level. (For rewards equal
# up to an ulp, (r − mean)/(std + eps) is ill-conditioned in any fp32 implementation.)
rewards_st = st.integers(-40, 40).map(lambda k: k / 4)


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(-3, 3), rewards_st), min_size=1, max_size=24),
       on_policy=st.lists(st.booleans(), min_size=24, max_size=24))
def test_properties(data, on_policy):
    """grpo/drgrpo advantages sum to ~0 over each group of ≥ 2; rloo is the leave-one-out definition; with
    on-policy statistics every mode matches the loops."""
    group_ids = torch.tensor([g for g, _ in data])
    rewards = torch.tensor([r for _, r in data], dtype=torch.float32)
    policy_id = torch.tensor([0 if p else 1 for p in on_policy[:len(data)]])
    for mode in ("grpo", "drgrpo"):
        adv = group_advantages(rewards, group_ids, mode=mode, backend="torch").double()
        budget = advantage_budget(rewards, group_ids, mode=mode)
        for g in group_ids.unique():
            members = group_ids == g
            if members.sum() >= 2:
                # Exactly 0 in exact arithmetic; each member's error is within its budget, and the float64
                # sum of these few fp32 values adds nothing measurable.
                tol = float(budget[members].sum())
                assert abs(float(adv[members].sum())) <= tol, (mode, adv[members])
    assert_advantages("rloo", rewards, group_ids,
                      group_advantages(rewards, group_ids, mode="rloo", backend="torch"), mode="rloo")
    for mode in MODES:
        kwargs = dict(mode=mode, policy_id=policy_id, stats="on_policy")
        assert_advantages(f"{mode}-on_policy", rewards, group_ids,
                          group_advantages(rewards, group_ids, backend="torch", **kwargs), **kwargs)


# ---- GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("mode", "stats"), list(itertools.product(MODES, STATS)))
def test_gpu_matches_reference(mode, stats):
    """4096 samples in shuffled groups of 8 plus ragged groups, on CUDA, against the CPU reference."""
    g = torch.Generator().manual_seed(6)
    group_ids = torch.cat([torch.arange(4096) // 8 * 7919, torch.randint(10**6, 10**6 + 50, (500,),
                                                                          generator=g)])
    group_ids = group_ids[torch.randperm(len(group_ids), generator=g)]
    rewards = torch.randn(len(group_ids), generator=g)
    policy_id = (torch.rand(len(group_ids), generator=g) < 0.2).long()
    got = group_advantages(rewards.cuda(), group_ids.cuda(), mode=mode, stats=stats,
                           policy_id=policy_id.cuda())
    assert got.is_cuda
    # The budget counts GPU ÷ and sqrt as FN_ERR-ulp operations.
    assert_advantages(f"adv[{mode},{stats}]", rewards, group_ids, got.cpu(), mode=mode, stats=stats,
                      policy_id=policy_id)


# ---- The CPU path: dense group index and fp64 statistics --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("ids", ["narrow", "narrow-with-gaps", "wide"])
def test_cpu_path_matches_the_loops_and_the_reference(mode, stats, ids):
    """The CPU path (`cpu.py`) takes ids from a narrow span directly (here 0..G-1 shifted to negatives, then a
    span with unused ids in it) and wide ones through torch.unique; each agrees with the loops within the
    budget and with the reference to fp32 rounding."""
    from npo_kernels.advantages.cpu import dense_group_index
    from npo_kernels.advantages.reference import group_advantages_ref

    rewards, group_ids, policy_id = make_batch(seed=3)
    dense = torch.unique(group_ids, return_inverse=True)[1]
    group_ids = {"narrow": dense - 3, "narrow-with-gaps": dense * 3 + 10, "wide": group_ids}[ids]
    index, num_groups = dense_group_index(group_ids)
    assert (num_groups > 6) == (ids == "narrow-with-gaps") and num_groups >= 6
    kwargs = dict(mode=mode, policy_id=policy_id, stats=stats)
    got = group_advantages(rewards, group_ids, backend="torch", **kwargs)
    assert got.dtype == torch.float32
    assert_advantages(f"{mode}/{stats}/{ids}", rewards, group_ids, got, **kwargs)
    ref = group_advantages_ref(rewards, group_ids, eps=1e-6, **kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cpu_path_gives_exact_zeros_without_the_shift():
    """fp64 sums of equal fp32 rewards are exact, so equal groups (of a value fp32 cannot hold exactly) and
    singletons give exactly 0, in narrow and wide id spans alike."""
    rewards = torch.tensor([0.1] * 7 + [1 / 3] * 5 + [2.7])
    for group_ids in (torch.tensor([0] * 7 + [1] * 5 + [2]), torch.tensor([10**12] * 7 + [-(10**12)] * 5 + [5])):
        for mode in MODES:
            got = group_advantages(rewards, group_ids, mode=mode, backend="torch")
            assert torch.equal(got, torch.zeros_like(got)), (mode, group_ids.tolist(), got)
