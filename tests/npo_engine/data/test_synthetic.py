"""The synthetic arithmetic task family and the prompt sampler."""

import pytest

from npo_engine.config import DataConfig
from npo_engine.data.sampler import PromptSampler, build_prompt_sets
from npo_engine.data.synthetic import arithmetic_problems, solve, split_of


def test_answers_are_exact():
    for record in arithmetic_problems("train", 500, seed=3):
        assert record.answer == str(eval(record.prompt[:-1]))
        assert len(record.prompt) == 2 * record.meta["level"] + 2  # level L has L + 1 single digits
    assert solve("12+30-50=") == "-8" and solve("7=") == "7"
    for bad in ["7*8=", "__import__('os')=", "=", "3++4=", "-3+4="]:
        with pytest.raises(ValueError):
            solve(bad)


def test_splits_are_disjoint_and_deterministic():
    train = arithmetic_problems("train", 3000, seed=0)
    held_out = arithmetic_problems("eval", 300, seed=0)
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}
    assert all(split_of(r.prompt) == "eval" for r in held_out)
    assert arithmetic_problems("train", 50, seed=0) == train[:50]  # same draw, prefix-stable
    assert arithmetic_problems("train", 50, seed=1) != train[:50]


def test_levels_and_errors():
    records = arithmetic_problems("train", 100, levels=(1,))
    assert {r.meta["level"] for r in records} == {1}
    with pytest.raises(ValueError, match="could not draw"):
        arithmetic_problems("train", 500, levels=(1,))  # only 200 one-digit problems exist
    with pytest.raises(ValueError, match="does not exist"):
        arithmetic_problems("train", 5, levels=(9,))


def test_sampler_is_a_pure_function_of_step():
    sets = build_prompt_sets(DataConfig(train_size=50, eval_size=10), seed=0)
    a = PromptSampler(sets.train, 8, seed=0)
    b = PromptSampler(sets.train, 8, seed=0)
    assert [r.id for r in a.batch(9)] == [r.id for r in b.batch(9)]  # random access, as after a resume
    epoch = [r.id for step in range(50 // 2) for r in PromptSampler(sets.train, 2, seed=0).batch(step)]
    assert sorted(epoch) == sorted(r.id for r in sets.train)  # one epoch visits every prompt once
    assert len(sets.eval) == 10
