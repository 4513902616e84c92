"""The baselines' pure parts (npo_method.md §13): which of a group's trajectories ExGRPO keeps as experience,
which experience prompts a step replays, and which successes fill RLEP's and LUFFY's slots.

Numbers and lists in, numbers and lists out; the pools, engines and samples live in `npo_engine.baselines`.
Randomness comes from a `random.Random` the caller seeds, so every choice is reproducible after a resume.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def experience_candidate(correct: Sequence[bool], entropy: Sequence[float]) -> int | None:
    """ExGRPO's pool rule for one group of on-policy samples: when some but not all are correct
    (0 < #correct < n), the index of the correct sample of lowest mean token entropy (the first on ties);
    otherwise None (an all-wrong group has nothing to keep, an all-correct one nothing left to learn).

    Args:
        correct: [n] whether each sample is verified correct.
        entropy: [n] each sample's mean per-token entropy under the policy that produced it.
    """
    if len(correct) != len(entropy):
        raise ValueError(f"correct has {len(correct)} samples, entropy {len(entropy)}")
    hits = [i for i, ok in enumerate(correct) if ok]
    if not 0 < len(hits) < len(correct):
        return None
    return min(hits, key=lambda i: (entropy[i], i))


def bucket_weight(accuracy: float, sigma: float) -> float:
    """ExGRPO's preference for medium-difficulty questions: the weight of the bucket of prompts whose latest
    on-policy accuracy is `accuracy`, a Gaussian N(accuracy; 0.5, sigma) up to a constant."""
    return math.exp(-((accuracy - 0.5) ** 2) / (2.0 * sigma**2))


def sample_experience(accuracy: dict[str, float], count: int, sigma: float, rng: random.Random,
                      exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Draw up to `count` distinct prompt ids from the experience pool, bucketed by accuracy: each draw picks a
    non-empty bucket with probability proportional to `bucket_weight`, then a prompt uniformly within it.

    Args:
        accuracy: prompt id -> its latest on-policy accuracy (the bucket key; the exact k/n values are buckets).
        count: how many to draw; fewer come back when the pool (less `exclude`) is smaller.
        exclude: prompt ids never drawn (e.g. already in the step's batch).

    Returns:
        The drawn ids in draw order.
    """
    buckets: dict[float, list[str]] = {}
    for prompt_id in sorted(accuracy):  # sorted: the draw must not depend on the pool's insertion order
        if prompt_id not in exclude:
            buckets.setdefault(accuracy[prompt_id], []).append(prompt_id)
    drawn: list[str] = []
    while len(drawn) < count and buckets:
        keys = sorted(buckets)
        key = rng.choices(keys, weights=[bucket_weight(k, sigma) for k in keys])[0]
        members = buckets[key]
        drawn.append(members.pop(rng.randrange(len(members))))
        if not members:
            del buckets[key]
    return drawn


def experience_share(prompts: int, ratio: float) -> int:
    """How many of a rank's `prompts` replay experience: round(ratio * prompts), at least 1 and leaving at
    least 1 fresh prompt when there are two or more."""
    if prompts < 2:
        return 0
    return min(max(round(ratio * prompts), 1), prompts - 1)


def pick_successes(successes: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """Up to `count` distinct entries of `successes` chosen uniformly (all of them when there are fewer), in
    the order they were sampled: the trajectories that fill a prompt's extra slots."""
    if count >= len(successes):
        return list(successes)
    return [successes[i] for i in sorted(rng.sample(range(len(successes)), count))]
