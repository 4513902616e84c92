"""Synthetic verifiable tasks: integer arithmetic with difficulty levels, a train split and a disjoint
held-out eval split.

A problem is a short expression such as `"347+58="`; its answer is the exact integer (`"405"`). Difficulty
grows with the number of digits and the operation:

| level | problems                                   |
|-------|--------------------------------------------|
| 1     | a+b, a-b with a, b < 10                    |
| 2     | a+b, a-b with a, b < 100                   |
| 3     | a+b, a-b with a, b < 1000; a*b, a, b < 10  |
| 4     | a+b, a-b with a, b < 10000; a*b, a < 100, b < 10 |
| 5     | a+b-c with a, b, c < 1000; a*b, a, b < 100 |

Splits are disjoint by construction: a problem belongs to `eval` when a stable hash of its text falls in the
eval bucket, so the same problem can never appear in both, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Literal

from npo_engine.data.records import PromptRecord

Split = Literal["train", "eval"]

_EVAL_BUCKETS = 10  # one problem in ten (by hash) is held out for evaluation
LEVELS = (1, 2, 3, 4, 5)


def _add(rng: random.Random, bound: int) -> str:
    return f"{rng.randrange(bound)}+{rng.randrange(bound)}="


def _sub(rng: random.Random, bound: int) -> str:
    return f"{rng.randrange(bound)}-{rng.randrange(bound)}="


def _mul(rng: random.Random, bound_a: int, bound_b: int) -> str:
    return f"{rng.randrange(bound_a)}*{rng.randrange(bound_b)}="


def _add_sub(rng: random.Random, bound: int) -> str:
    return f"{rng.randrange(bound)}+{rng.randrange(bound)}-{rng.randrange(bound)}="


# Each level draws one of its generators uniformly.
_GENERATORS: dict[int, list[Callable[[random.Random], str]]] = {
    1: [lambda r: _add(r, 10), lambda r: _sub(r, 10)],
    2: [lambda r: _add(r, 100), lambda r: _sub(r, 100)],
    3: [lambda r: _add(r, 1000), lambda r: _sub(r, 1000), lambda r: _mul(r, 10, 10)],
    4: [lambda r: _add(r, 10000), lambda r: _sub(r, 10000), lambda r: _mul(r, 100, 10)],
    5: [lambda r: _add_sub(r, 1000), lambda r: _mul(r, 100, 100)],
}


def solve(expression: str) -> str:
    """The exact integer value of a problem such as `"12+3-4="` (only + - * and non-negative integers)."""
    body = expression.rstrip("=")
    if not body or any(c not in "0123456789+-*" for c in body):
        raise ValueError(f"not an arithmetic problem: {expression!r}")
    return str(eval(body, {"__builtins__": {}}, {}))  # safe: the character check above admits digits and + - * only


def split_of(problem: str) -> Split:
    digest = hashlib.sha256(problem.encode()).digest()
    return "eval" if digest[0] % _EVAL_BUCKETS == 0 else "train"


def arithmetic_problems(
    split: Split, count: int, *, levels: tuple[int, ...] = LEVELS, seed: int = 0, weights: tuple[float, ...] | None = None
) -> list[PromptRecord]:
    """`count` distinct problems of the given split, levels drawn with `weights` (uniform by default).

    Deterministic in (split, count, levels, seed, weights). Raises if the levels cannot supply `count`
    distinct problems (e.g. level 1 alone has only 200).
    """
    for level in levels:
        if level not in _GENERATORS:
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
        problem = rng.choice(_GENERATORS[level])(rng)
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        records.append(
            PromptRecord(id=f"arith-{split}-{len(records)}", prompt=problem, answer=solve(problem),
                         meta={"level": level})
        )
    return records
