"""Synthetic verifiable tasks: chains of single-digit additions and subtractions with difficulty levels, a
train split and a disjoint held-out eval split.

A problem is a chain such as `"7-3+9-1="`; its answer is the exact integer (`"12"`). Level L has L + 1 terms,
so level 1 (`"4+8="`) is a lookup while level 5 (`"3+9-7+8-2+6="`) needs five carried partial results in a
single forward pass per output token. Answers are short (at most three characters), so the verifier is an
exact match and a sampled completion is right or wrong, never partly right.

| level | terms | distinct problems |
|-------|-------|-------------------|
| 1     | 2     | 200               |
| 2     | 3     | 4,000             |
| 3     | 4     | 80,000            |
| 4     | 5     | 1.6 million       |
| 5     | 6     | 32 million        |

Splits are disjoint by construction: a problem belongs to `eval` when a stable hash of its text falls in the
eval bucket, so the same problem can never appear in both, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from npo_engine.data.records import PromptRecord

Split = Literal["train", "eval"]

LEVELS = (1, 2, 3, 4, 5)
_EVAL_BUCKETS = 10  # one problem in ten (by hash) is held out for evaluation


def make_problem(rng: random.Random, level: int) -> str:
    """A chain of `level + 1` random digits joined by random + and - signs, ending in "="."""
    text = str(rng.randrange(10))
    for _ in range(level):
        text += rng.choice("+-") + str(rng.randrange(10))
    return text + "="


def solve(expression: str) -> str:
    """The exact integer value of a chain such as `"12+3-4="` (non-negative integers, + and - only)."""
    body = expression.rstrip("=")
    if not body or body[0] not in "0123456789" or any(c not in "0123456789+-" for c in body):
        raise ValueError(f"not an addition/subtraction chain: {expression!r}")
    total, sign, number = 0, 1, ""
    for char in body + "+":
        if char.isdigit():
            number += char
            continue
        if not number:
            raise ValueError(f"not an addition/subtraction chain: {expression!r}")
        total += sign * int(number)
        sign, number = (1 if char == "+" else -1), ""
    return str(total)


def split_of(problem: str) -> Split:
    digest = hashlib.sha256(problem.encode()).digest()
    return "eval" if digest[0] % _EVAL_BUCKETS == 0 else "train"


def arithmetic_problems(
    split: Split, count: int, *, levels: tuple[int, ...] = LEVELS, seed: int = 0,
    weights: tuple[float, ...] | None = None,
) -> list[PromptRecord]:
    """`count` distinct problems of the given split, levels drawn with `weights` (uniform by default).

    Deterministic in (split, count, levels, seed, weights). Raises if the levels cannot supply `count`
    distinct problems (level 1 alone has 200, of which about 20 are held out).
    """
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"arithmetic level {level} does not exist; levels are {LEVELS}")
    if weights is not None and len(weights) != len(levels):
        raise ValueError(f"weights {weights} must have one entry per level {levels}")
    rng = random.Random(f"arithmetic/{split}/{seed}")
    seen: set[str] = set()
    records: list[PromptRecord] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise ValueError(
                f"could not draw {count} distinct {split} problems from levels {levels}; "
                "ask for fewer or add harder levels"
            )
        level = rng.choices(levels, weights=weights)[0]
        problem = make_problem(rng, level)
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        records.append(PromptRecord(id=f"arith-{split}-{len(records)}", prompt=problem, answer=solve(problem),
                                    meta={"level": level}))
    return records
