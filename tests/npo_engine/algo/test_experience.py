"""The baselines' pure choices (algo.experience) on hand-built inputs."""

import math
import random
from collections import Counter

import pytest

from npo_engine.algo import experience


def test_experience_candidate_is_the_lowest_entropy_success_of_a_partly_solved_group():
    correct = [False, True, True, False, True]
    entropy = [0.1, 0.9, 0.4, 0.2, 0.4]  # the wrong sample at 0.1 and 0.2 never counts; 0.4 ties: the first
    assert experience.experience_candidate(correct, entropy) == 2
    assert experience.experience_candidate([True, True], [0.5, 0.1]) is None   # all correct: retired
    assert experience.experience_candidate([False, False], [0.5, 0.1]) is None  # nothing verified to keep
    with pytest.raises(ValueError, match="correct has 2 samples, entropy 1"):
        experience.experience_candidate([True, False], [0.3])


def test_bucket_weight_prefers_medium_difficulty():
    assert experience.bucket_weight(0.5, 1.0) == 1.0
    assert experience.bucket_weight(0.25, 1.0) == pytest.approx(math.exp(-0.0625 / 2))
    assert experience.bucket_weight(0.0, 0.5) == pytest.approx(math.exp(-0.5))
    assert experience.bucket_weight(0.125, 1.0) == experience.bucket_weight(0.875, 1.0)


def test_sample_experience_draws_distinct_prompts_by_bucket_weight():
    accuracy = {"a": 0.5, "b": 0.5, "c": 0.125, "d": 0.875}
    drawn = experience.sample_experience(accuracy, 3, 1.0, random.Random(0), exclude={"b"})
    assert sorted(drawn) == ["a", "c", "d"]  # distinct, never an excluded one, all there is
    assert len(experience.sample_experience(accuracy, 9, 1.0, random.Random(0))) == 4
    assert experience.sample_experience({}, 3, 1.0, random.Random(0)) == []
    # Same seed, same draw, whatever order the pool was built in.
    reordered = dict(reversed(list(accuracy.items())))
    assert (experience.sample_experience(accuracy, 2, 1.0, random.Random(7))
            == experience.sample_experience(reordered, 2, 1.0, random.Random(7)))


def test_first_draw_follows_the_bucket_weights():
    # Two buckets: 0.5 (weight 1) and 0.0 (weight exp(-0.125 / sigma^2) with sigma = 0.5, i.e. e^-0.5).
    accuracy = {"mid": 0.5, "hard": 0.0}
    draws = 20_000
    counts = Counter(experience.sample_experience(accuracy, 1, 0.5, random.Random(seed))[0] for seed in range(draws))
    expected = 1.0 / (1.0 + math.exp(-0.5))
    # Binomial standard deviation sqrt(p(1-p)/N) = 0.0033; 5 sigma.
    assert abs(counts["mid"] / draws - expected) < 5 * math.sqrt(expected * (1 - expected) / draws)


@pytest.mark.parametrize("prompts, ratio, share", [(16, 0.5, 8), (4, 0.5, 2), (2, 0.5, 1), (3, 0.9, 2),
                                                   (8, 0.01, 1), (1, 0.5, 0)])
def test_experience_share(prompts, ratio, share):
    assert experience.experience_share(prompts, ratio) == share


def test_pick_successes_keeps_sampling_order_and_is_uniform():
    assert experience.pick_successes(["x", "y"], 3, random.Random(0)) == ["x", "y"]
    picked = experience.pick_successes(list("abcdef"), 2, random.Random(1))
    assert len(set(picked)) == 2 and picked == sorted(picked)
    counts = Counter(x for seed in range(6000) for x in experience.pick_successes(list("abc"), 1, random.Random(seed)))
    assert all(abs(counts[k] / 6000 - 1 / 3) < 5 * math.sqrt((1 / 3) * (2 / 3) / 6000) for k in "abc")
