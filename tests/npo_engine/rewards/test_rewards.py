"""Verifiers and the reward runner: built-in verdicts, user verifiers by import path, and a run that survives
verifiers that raise, hang (in Python or in a blocking call), die, or return garbage."""

from __future__ import annotations

import logging
import math
import os
import sys
import textwrap
import time
from typing import Iterator

import pytest

from npo_engine.rewards import VERIFIERS, RewardRunner, exact_match, math_verify, resolve_verifier
from npo_engine.rewards.verifiers import last_boxed

# Short per-call timeout so the hang tests are fast; long enough that a loaded 2-core CI box answers a
# trivial call in time.
TIMEOUT_S = 1.0
# A hang must be cut off within the timeout plus this slack (worker kill and restart included).
HANG_SLACK_S = 10.0

USER_MODULE = "npo_test_user_verifiers"
USER_SOURCE = textwrap.dedent(
    """
    import math, os, time

    def check(prompt, completion, answer):
        if completion == "raise":
            raise KeyError("verifier bug")
        if completion == "loop":
            while True:
                pass
        if completion == "sleep":
            time.sleep(100)
        if completion == "die":
            os._exit(3)
        if completion == "nan":
            return math.nan
        if completion == "inf":
            return math.inf
        if completion == "str":
            return "1.0"
        if completion == "none":
            return None
        if completion == "huge":
            return 1e308
        if completion == "negative":
            return -50.0
        return 1.0 if completion.strip() == answer.strip() else 0.0

    def pid(prompt, completion, answer):
        return float(os.getpid())

    def two_args(prompt, completion):
        return 1.0

    NOT_CALLABLE = 3
    """
)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A verifier module in a temp folder, importable here (sys.path) and in workers (PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("user_verifiers")
    (folder / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


@pytest.fixture(scope="module")
def runner(user_module: str) -> Iterator[RewardRunner]:
    """One worker-backed runner shared by the tests below, so the suite pays worker start-up once."""
    with RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S) as r:
        yield r


def score(runner: RewardRunner, completions: list[str], answers: list[str] | None = None):
    answers = answers if answers is not None else ["ok"] * len(completions)
    return runner.score(["prompt"] * len(completions), completions, answers)


# --------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("42", "42", 1.0),
        ("  42\n", " 42 ", 1.0),  # surrounding whitespace is ignored
        ("The answer is \\boxed{42}.", "42", 1.0),  # last \boxed{} content
        ("\\boxed{1} then \\boxed{ 42 }", "42", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
        ("41", "42", 0.0),
        ("42.0", "42", 0.0),  # exact: no numeric normalization
        ("The answer is 42", "42", 0.0),  # no marker parsing beyond \boxed{}
        ("\\boxed{42", "42", 0.0),  # unclosed
    ],
)
def test_exact_match(completion: str, answer: str, reward: float) -> None:
    assert exact_match("p", completion, answer) == reward


def test_last_boxed() -> None:
    assert last_boxed("a \\boxed{x} b \\boxed{{y}+1}") == "{y}+1"
    assert last_boxed("none") is None


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("0.5", "1/2", 1.0),
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
        ("So we get \\boxed{3}.", "3", 1.0),
        ("\\boxed{2}", "\\frac{4}{2}", 1.0),
        ("\\boxed{4}", "3", 0.0),
        ("no number here", "3", 0.0),
    ],
)
def test_math_verify_equivalent_forms(completion: str, answer: str, reward: float) -> None:
    assert math_verify("p", completion, answer) == reward


def test_math_verify_unparseable_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot parse the reference answer"):
        math_verify("p", "1", "")


def test_resolve_builtins() -> None:
    assert resolve_verifier("exact_match") is exact_match
    assert resolve_verifier("math") is math_verify
    assert set(VERIFIERS) == {"exact_match", "math"}


# ------------------------------------------------------------------------------------ verifier names


def test_resolve_user_verifier(user_module: str) -> None:
    fn = resolve_verifier(f"{user_module}:check")
    assert fn("p", " 7 ", "7") == 1.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("exactmatch", r"unknown verifier 'exactmatch'; built-ins: exact_match, math, or give .*:function'"),
        ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz' .*PYTHONPATH.*module:function'"),
        ("{mod}:nope", r"module '{mod}' has no attribute 'nope' .*'package.module:function'"),
        ("{mod}:NOT_CALLABLE", r"is not callable \(type: int\); it must name a function"),
        ("{mod}:two_args", r"must accept three positional arguments \(prompt, completion, answer\)"),
        (":check", r"not of the form 'package.module:function'"),
        ("__main__:f", r"lives in the script being run.*move it into a module file"),
    ],
    ids=["unknown", "bad-module", "bad-attribute", "not-callable", "wrong-arity", "no-module", "main"],
)
def test_bad_verifier_names(user_module: str, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.format(mod=user_module)):
        resolve_verifier(name.format(mod=user_module))


def test_runner_rejects_bad_names_and_arguments(user_module: str) -> None:
    with pytest.raises(ValueError, match="unknown verifier 'mathh'"):
        RewardRunner("mathh")  # caught before any process starts
    # A bad path is found by the worker at start-up and raised here, in the constructor.
    with pytest.raises(ValueError, match=f"module '{user_module}' has no attribute 'nope'"):
        RewardRunner(f"{user_module}:nope")
    with pytest.raises(ValueError, match="timeout_s must be a finite number > 0"):
        RewardRunner("exact_match", timeout_s=0)
    with pytest.raises(ValueError, match="num_workers must be an int >= 1"):
        RewardRunner("exact_match", num_workers=0)


# ------------------------------------------------------------------------------------------- runner


def test_exact_match_runs_in_process() -> None:
    with RewardRunner("exact_match") as r:
        result = r.score(["p", "p", "p"], ["4", "\\boxed{4}", "5"], ["4", "4", "4"])
    assert result.rewards == [1.0, 1.0, 0.0]
    assert result.stats["reward/verifier_errors"] == 0.0
    assert result.stats["reward/verifier_timeouts"] == 0.0
    assert result.stats["reward/verify_seconds"] >= 0.0


def test_math_runner_end_to_end() -> None:
    with RewardRunner("math", timeout_s=10.0) as r:
        result = r.score(["p"] * 3, ["0.5", "\\boxed{3}", "7"], ["1/2", "3", "8"])
    assert result.rewards == [1.0, 1.0, 0.0]


def test_user_verifier_scores_in_order(runner: RewardRunner) -> None:
    result = score(runner, ["ok", "no", " ok "])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.stats["reward/verifier_errors"] == 0.0


def test_raising_verifier_scores_zero_and_run_continues(
    runner: RewardRunner, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="npo_engine.rewards.runner"):
        result = score(runner, ["ok", "raise", "ok", "raise", "ok"])
    assert result.rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.stats["reward/verifier_errors"] == 2.0
    # One warning per call, naming the exception and the verifier's own line.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "KeyError: 'verifier bug'" in warnings[0].getMessage()
    assert f"{USER_MODULE}.py" in warnings[0].getMessage()


@pytest.mark.parametrize("value", ["nan", "inf", "str", "none"])
def test_non_number_or_non_finite_reward_scores_zero(runner: RewardRunner, value: str) -> None:
    result = score(runner, ["ok", value, "ok"])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.stats["reward/verifier_errors"] == 1.0
    assert all(math.isfinite(x) for x in result.rewards)


@pytest.mark.parametrize("hang", ["loop", "sleep"], ids=["python-loop", "blocking-call"])
def test_hanging_verifier_times_out_and_worker_restarts(runner: RewardRunner, hang: str) -> None:
    start = time.monotonic()
    result = score(runner, ["ok", hang, "ok", "no"])
    elapsed = time.monotonic() - start
    assert result.rewards == [1.0, 0.0, 1.0, 0.0]  # the samples after the stuck one were still scored
    assert result.stats["reward/verifier_timeouts"] == 1.0
    assert result.stats["reward/verifier_errors"] == 0.0
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + HANG_SLACK_S
    assert score(runner, ["ok"]).rewards == [1.0]  # the next call works


def test_hang_as_last_sample_then_next_call(runner: RewardRunner) -> None:
    result = score(runner, ["ok", "sleep"])
    assert result.rewards == [1.0, 0.0] and result.stats["reward/verifier_timeouts"] == 1.0
    assert score(runner, ["ok", "ok"]).rewards == [1.0, 1.0]


def test_dying_worker_scores_zero_and_is_replaced(runner: RewardRunner) -> None:
    result = score(runner, ["ok", "die", "ok"])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.stats["reward/verifier_errors"] == 1.0


def test_several_workers_split_the_batch(user_module: str) -> None:
    with RewardRunner(f"{user_module}:pid", num_workers=2) as r:
        pids = r.score(["p"] * 6, ["c"] * 6, ["a"] * 6).rewards
    assert len(set(pids)) == 2 and pids[:3] == [pids[0]] * 3 and pids[3:] == [pids[3]] * 3
    assert os.getpid() not in pids


def test_several_workers_with_a_hang(user_module: str) -> None:
    with RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S, num_workers=2) as r:
        result = r.score(["p"] * 6, ["ok", "loop", "ok", "ok", "raise", "ok"], ["ok"] * 6)
    assert result.rewards == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert result.stats["reward/verifier_timeouts"] == 1.0 and result.stats["reward/verifier_errors"] == 1.0


def test_close_stops_workers_and_is_idempotent(user_module: str) -> None:
    r = RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S)
    procs = [w.proc for w in r._workers if w is not None]
    r.close()
    r.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="after close"):
        score(r, ["ok"])


def test_garbage_collected_runner_stops_its_worker(user_module: str) -> None:
    r = RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S)
    (proc,) = [w.proc for w in r._workers if w is not None]
    del r
    proc.wait(timeout=10)


def test_score_argument_checks(runner: RewardRunner) -> None:
    with pytest.raises(ValueError, match="got 2 prompts, 1 completions, 1 answers"):
        runner.score(["p", "p"], ["c"], ["a"])
    empty = runner.score([], [], [])
    assert empty.rewards == [] and empty.stats["reward/verifier_errors"] == 0.0


def test_time_budget_bounds_a_verifier_that_hangs_on_every_sample(user_module: str) -> None:
    """Without the per-call budget 19 hanging samples would cost 19 x timeout_s; the step's budget cuts it."""
    budget = 2.5
    with RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S, step_timeout_s=budget) as r:
        start = time.monotonic()
        result = r.score(["p"] * 20, ["ok", *["sleep"] * 19], ["ok"] * 20)
        elapsed = time.monotonic() - start
        assert budget <= elapsed < budget + HANG_SLACK_S
        assert result.rewards == [1.0] + [0.0] * 19
        stats = result.stats
        assert stats["reward/verifier_timeouts"] + stats["reward/verifier_skipped"] == 19
        assert stats["reward/verifier_skipped"] >= 19 - budget / TIMEOUT_S - 1
        assert r.score(["p"], ["ok"], ["ok"]).rewards == [1.0]  # the replaced worker scores the next call


def test_rewards_outside_the_clip_range_are_clipped_and_counted(user_module: str) -> None:
    with RewardRunner(f"{user_module}:check", timeout_s=TIMEOUT_S, clip_range=(-10.0, 10.0)) as r:
        result = r.score(["p"] * 3, ["huge", "ok", "negative"], ["ok"] * 3)
    assert result.rewards == [10.0, 1.0, -10.0]
    assert result.stats["reward/clipped"] == 2.0 and result.stats["reward/verifier_errors"] == 0.0
    with pytest.raises(ValueError, match="clip_range"):
        RewardRunner("exact_match", clip_range=(1.0, -1.0))
