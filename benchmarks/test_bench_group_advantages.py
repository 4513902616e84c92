"""group_advantages vs the per-sample Python loop over a dict of groups that verl and LUFFY use.

4096 samples in shuffled groups of 8 (512 prompts × 8 rollouts), GRPO with the unbiased std. Group ids are
either spread out (`ids=spread`: large, far apart, as hashed or global ids are) or the trainer's dense
0..G-1 (`ids=dense`). Providers:
    python_loop   verl `compute_grpo_outcome_advantage` (LUFFY's copy is the same loop): id2score dict of
                  lists, torch mean/std per group, then a loop over samples
    simple_torch  the simplest correct vectorized PyTorch: torch.unique for a dense index, index_add_ for the
                  counts, sums and squared deviations (the bar the public op must meet on CPU)
    torch         the public op, `group_advantages(..., backend="torch")` (what "auto" runs on CPU), argument
                  checks and dispatch included
    triton        our one-launch kernel (CUDA only; the CPU interpreter is not a performance path)
The first test per device times the loop; each later provider records `speedup_vs_python_loop` in extra_info.

    pytest benchmarks/test_bench_group_advantages.py --benchmark-enable \
        --benchmark-json=benchmarks/results/cpu_group_advantages.json
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from npo_kernels.advantages.op import group_advantages

HAS_CUDA = torch.cuda.is_available()
NUM_PROMPTS, GROUP_SIZE = 512, 8
EPS = 1e-6
PROVIDERS = ["python_loop", "simple_torch", "torch"] + (["triton"] if HAS_CUDA else [])
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

_MEDIAN_S: dict[tuple[str, str, str], float] = {}  # (device, ids, provider) -> median seconds, for the speedup


def simple_torch_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The simplest correct vectorized GRPO advantages: unique for a dense index, index_add_ for the counts,
    sums and squared deviations (two passes), unbiased std; a group of one gives 0."""
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1
    counts = torch.zeros(num_groups, device=rewards.device).index_add_(0, index, torch.ones_like(rewards))
    sums = torch.zeros(num_groups, device=rewards.device).index_add_(0, index, rewards)
    centered = rewards - (sums / counts)[index]
    sq_dev = torch.zeros(num_groups, device=rewards.device).index_add_(0, index, centered * centered)
    std = (sq_dev / (counts - 1).clamp(min=1)).sqrt()[index]
    return torch.where(counts[index] > 1, centered / (std + eps), torch.zeros_like(centered))


def verl_grpo_advantages(scores: torch.Tensor, index: np.ndarray, epsilon: float = EPS) -> torch.Tensor:
    """verl's GRPO outcome advantage (verl/trainer/ppo/core_algos.py), scores [B] already summed over tokens.

    The loop is kept as written there: per-sample appends to a dict of lists, torch mean/std per group, and a
    per-sample normalization written back into `scores` in place.
    """
    scores = scores.clone()  # verl mutates its local `scores`; keep the input reusable across rounds
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
    return scores


def make_batch(device: str, ids: str = "spread"):
    """Rewards [B] (0/1 plus partial credit), shuffled group ids [B] (large and far apart, or 0..G-1), and
    verl's uid array."""
    g = torch.Generator().manual_seed(0)
    group_ids = torch.arange(NUM_PROMPTS * GROUP_SIZE) // GROUP_SIZE
    if ids == "spread":
        group_ids = group_ids * 7919 + 1000003
    group_ids = group_ids[torch.randperm(len(group_ids), generator=g)]
    rewards = torch.randint(0, 3, (len(group_ids),), generator=g).float() / 2
    uids = np.array([f"uid-{i}" for i in group_ids.tolist()], dtype=object)  # verl's non_tensor_batch["uid"]
    return rewards.to(device), group_ids.to(device), uids


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ids", ["spread", "dense"])
@pytest.mark.parametrize("device", DEVICES)
def test_group_advantages(benchmark, device, ids, provider):
    if provider == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, not a CPU backend")
    rewards, group_ids, uids = make_batch(device, ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "python_loop":
        rewards_host = rewards.cpu()  # verl runs this loop on CPU tensors

        def run():
            return verl_grpo_advantages(rewards_host, uids)
        rounds, warmup = 5, 1
    elif provider == "simple_torch":
        def run():
            out = simple_torch_advantages(rewards, group_ids)
            sync()
            return out
        rounds, warmup = 301, 20
    else:
        def run():
            out = group_advantages(rewards, group_ids, mode="grpo", eps=EPS, backend=provider)
            sync()  # CUDA launches are asynchronous; time the finished result
            return out
        rounds, warmup = 301, 20

    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    # Same numbers as the loop (verl also uses the unbiased std and eps = 1e-6; no singleton groups here).
    torch.testing.assert_close(out.cpu(), verl_grpo_advantages(rewards.cpu(), uids), atol=1e-5, rtol=1e-5)

    num = rewards.numel()
    benchmark.extra_info.update(
        op="group_advantages", provider=provider, device=device, ids=ids, shape=f"B{num}-G{GROUP_SIZE}",
        dtype="float32",
        # rewards + group ids read, advantages written
        bytes_moved=num * (rewards.element_size() + group_ids.element_size() + 4),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        _MEDIAN_S[(device, ids, provider)] = median
        loop = _MEDIAN_S.get((device, ids, "python_loop"))
        simple = _MEDIAN_S.get((device, ids, "simple_torch"))
        if loop is not None and provider != "python_loop":
            benchmark.extra_info["speedup_vs_python_loop"] = loop / median
            print(f"\n{device} {ids} {provider}: {median * 1e6:.1f} us, {loop / median:.0f}x the python loop "
                  f"({loop * 1e3:.1f} ms)")
        if simple is not None and provider not in ("python_loop", "simple_torch"):
            benchmark.extra_info["speedup_vs_simple_torch"] = simple / median
            print(f"{device} {ids} {provider}: {simple / median:.2f}x simple_torch ({simple * 1e6:.1f} us)")
