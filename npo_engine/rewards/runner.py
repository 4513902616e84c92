"""Scoring a step's completions with a verifier, with a real per-call timeout, without ever stopping the run.

A verifier call that raises, returns something that is not a finite number, or runs longer than
`timeout_s` gives that sample reward 0.0 and is counted in the stats (`reward/verifier_errors`,
`reward/verifier_timeouts`); each `score()` call with such samples logs ONE warning with the counts and the
first failure's traceback summary.

Where verifiers run:
- `"exact_match"` runs in the calling process: it is a string comparison that cannot hang, and a worker
  round trip would cost more than the comparison.
- Every other verifier runs in worker processes. A thread cannot be stopped from outside, a process can:
  when a call exceeds `timeout_s` (a pure-Python infinite loop, a C call that never returns) the worker is
  killed, a fresh one is started, and the samples after the stuck one are sent to it. A worker that dies
  (segfault, `sys.exit` in user code) is handled the same way.
- Workers are fresh interpreters (`python -c`, started by `subprocess`, i.e. fork + immediate exec), not
  multiprocessing children: fork would copy the trainer's torch/OpenMP threads and CUDA state into a
  broken child, and multiprocessing's "spawn"/"forkserver" re-import the trainer's `__main__` module
  (torch, vLLM: seconds) in every worker and again at every restart after a timeout. The worker gets the
  trainer's `sys.path` through PYTHONPATH and imports the verifier by name, so a user verifier must be
  importable from that path (installed, or its folder on `sys.path` / PYTHONPATH).
- The workers start once, in the constructor (a bad verifier path fails there, not at step 1), and are
  reused; `score()` sends each worker its share of the step in ONE message and the worker streams back one
  small result per sample, which is how the parent knows which sample is stuck.
- Workers end with `close()`, when the runner is garbage collected, at interpreter exit, and by
  themselves when the trainer process disappears (their pipe closes, or a watchdog thread sees a new
  parent pid).

The timeout is per call and is measured by the parent from the previous answer of the same worker, so
worker start-up and the time the parent spends elsewhere never count against a sample.

Two bounds per `score()` call keep one bad verifier from stalling or derailing a step:
- `step_timeout_s`, a time budget for the whole call: when it runs out, the workers still busy are killed
  (replacements start at once), and every sample not scored yet gets 0.0 and is counted
  (`reward/verifier_skipped`). A verifier that hangs on every sample then costs the budget, not
  `timeout_s` times the number of samples.
- `clip_range`: a finite reward outside [low, high] is clipped into it and counted (`reward/clipped`); a huge
  reward (1e308) would overflow the group statistics of the advantages.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from npo_engine.rewards.verifiers import VERIFIERS, Verifier, resolve_verifier

logger = logging.getLogger(__name__)

# Verifiers that run in the calling process: pure string functions that cannot hang.
_IN_PROCESS_VERIFIERS = frozenset({"exact_match"})
# Generous: the worker imports the verifier before it is ready ("math" imports sympy, about 1-2 s on a
# loaded machine; a user module may import torch). Only start-up waits this long, never a sample.
_STARTUP_TIMEOUT_S = 120.0
# How long close() waits for a worker to exit on its own before killing it.
_CLOSE_TIMEOUT_S = 2.0
# How often a worker checks that the trainer still exists, so a worker stuck in Python code does not
# outlive a trainer that was killed with SIGKILL (atexit cleanup only runs on a normal exit).
_ORPHAN_CHECK_S = 1.0
_SUMMARY_FRAMES = 3  # traceback frames kept in a failure summary: the verifier's own lines, not the runner's


@dataclass
class RewardResult:
    """Rewards for one step, in the order of the inputs, and error counts for the metrics log."""

    rewards: list[float]
    """[B] one reward per completion; 0.0 where the verifier failed."""
    stats: dict[str, float]
    """`reward/verifier_errors`, `reward/verifier_timeouts`, `reward/verifier_skipped` (out of the step's time
    budget), `reward/clipped` (counts), `reward/verify_seconds` (wall time)."""


class RewardRunner:
    """Scores completions with one verifier, isolating the run from the verifier's failures.

    Args:
        verifier: a built-in name ("exact_match", "math") or `"package.module:function"`.
        timeout_s: wall-clock limit of ONE verifier call; a call that exceeds it scores 0.0.
        num_workers: worker processes for verifiers other than "exact_match"; a step's samples are split
            into this many contiguous shards scored in parallel.
        step_timeout_s: time budget of one `score()` call (None: no budget); see the module docstring.
        clip_range: (low, high) bounds of a reward (None: no clipping); see the module docstring.

    Use it as a context manager or call `close()`; workers are also stopped when the runner is garbage
    collected and at interpreter exit. Not thread-safe: call `score()` from one thread at a time.
    """

    def __init__(self, verifier: str, *, timeout_s: float = 5.0, num_workers: int = 1,
                 step_timeout_s: float | None = None, clip_range: tuple[float, float] | None = None) -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(
                f"reward timeout_s must be a finite number > 0 (seconds per call), got {timeout_s!r}"
            )
        if step_timeout_s is not None and not (math.isfinite(step_timeout_s) and step_timeout_s > 0):
            raise ValueError(f"reward step_timeout_s must be a finite number > 0 (seconds per call of score()), "
                             f"got {step_timeout_s!r}")
        if clip_range is not None and not (len(clip_range) == 2 and all(map(math.isfinite, clip_range))
                                           and clip_range[0] < clip_range[1]):
            raise ValueError(f"reward clip_range must be two finite numbers (low, high) with low < high, "
                             f"got {clip_range!r}")
        self.step_timeout_s = step_timeout_s
        self.clip_range = None if clip_range is None else (float(clip_range[0]), float(clip_range[1]))
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"reward num_workers must be an int >= 1, got {num_workers!r}")
        self.verifier = verifier
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self._closed = False
        self._fn: Verifier | None = None
        self._workers: list[_Worker | None] = []
        self._finalizer: weakref.finalize | None = None
        if not isinstance(verifier, str) or (":" not in verifier and verifier not in VERIFIERS):
            resolve_verifier(verifier)  # raises the "unknown verifier" error without starting a process
        if verifier in _IN_PROCESS_VERIFIERS:
            self._fn = resolve_verifier(verifier)
            return
        # The finalizer holds the list, not self, so it can run when self is collected; it also runs at exit.
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        starting = [_Worker(verifier) for _ in range(num_workers)]
        self._workers.extend(starting)
        try:
            for w in starting:
                w.wait_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ public

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
    ) -> RewardResult:
        """Rewards for `completions[i]` against `answers[i]` (prompt `prompts[i]`), all lists of length B."""
        if self._closed:
            raise RuntimeError("RewardRunner.score() called after close(); create a new RewardRunner")
        if not len(prompts) == len(completions) == len(answers):
            raise ValueError(
                f"score() needs one prompt and one answer per completion; got {len(prompts)} prompts, "
                f"{len(completions)} completions, {len(answers)} answers"
            )
        start = time.perf_counter()
        tally = _Tally(len(completions), self.clip_range)
        if self._fn is not None:
            for i, (p, c, a) in enumerate(zip(prompts, completions, answers)):
                tally.record(i, *_call_verifier(self._fn, p, c, a), timed_out=False)
        elif completions:
            budget = self.step_timeout_s if self.step_timeout_s is not None else math.inf
            self._score_in_workers(list(zip(prompts, completions, answers)), tally, time.monotonic() + budget)
        seconds = time.perf_counter() - start
        if tally.errors or tally.timeouts or tally.skipped:
            logger.warning(
                "reward verifier %r: %d of %d samples got reward 0.0 (%d errors, %d timeouts at "
                "timeout_s=%g, %d not scored within step_timeout_s=%s); first: %s. Fix the verifier%s.",
                self.verifier, tally.errors + tally.timeouts + tally.skipped, len(completions), tally.errors,
                tally.timeouts, self.timeout_s, tally.skipped, self.step_timeout_s, tally.first_failure,
                ", or raise the reward timeouts" if tally.timeouts or tally.skipped else "",
            )
        if tally.clipped:
            logger.warning("reward verifier %r: %d of %d rewards were outside clip_range %s and were clipped; "
                           "first: %s", self.verifier, tally.clipped, len(completions), self.clip_range,
                           tally.first_clipped)
        return RewardResult(
            rewards=tally.rewards,
            stats={
                "reward/verifier_errors": float(tally.errors),
                "reward/verifier_timeouts": float(tally.timeouts),
                "reward/verifier_skipped": float(tally.skipped),
                "reward/clipped": float(tally.clipped),
                "reward/verify_seconds": seconds,
            },
        )

    def close(self) -> None:
        """Stop the worker processes. Idempotent; `score()` fails afterwards."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------- workers

    def _score_in_workers(self, samples: list[tuple[str, str, str]], tally: _Tally, budget_end: float) -> None:
        n = len(samples)
        n_shards = min(self.num_workers, n)
        bounds = [n * k // n_shards for k in range(n_shards + 1)]
        # worker slot → indices of the samples sent to it and not answered yet, in the order sent
        pending = {slot: deque(range(bounds[slot], bounds[slot + 1])) for slot in range(n_shards)}
        for slot in pending:
            self._send(slot, samples, pending[slot], tally)
        # A slot's deadline is one timeout after its last answer: the time its current call has had.
        deadline = {slot: time.monotonic() + self.timeout_s for slot in pending}
        pending = {slot: queue for slot, queue in pending.items() if queue}

        while pending:
            if time.monotonic() >= budget_end:
                self._skip_rest(samples, pending, tally)
                return
            conns = {self._live(slot).conn: slot for slot in pending}
            timeout = max(0.0, min(budget_end, *(deadline[slot] for slot in pending)) - time.monotonic())
            ready_slots = {conns[c] for c in wait(list(conns), timeout=timeout)}  # type: ignore[index]
            now = time.monotonic()
            for slot in ready_slots:
                worker = self._live(slot)
                try:
                    while pending[slot] and worker.conn.poll():
                        i, reward, error = worker.conn.recv()
                        # Workers answer in the order they were sent; anything else is a runner bug.
                        assert i == pending[slot][0], (i, pending[slot][0])
                        tally.record(pending[slot].popleft(), reward, error, timed_out=False)
                        deadline[slot] = now + self.timeout_s
                except (EOFError, OSError):
                    why = f"the reward worker process died (exit code {worker.proc.poll()}) during this call"
                    self._fail_first(slot, samples, pending[slot], tally, why=why, timed_out=False)
                    deadline[slot] = time.monotonic() + self.timeout_s
            for slot in pending:
                if slot not in ready_slots and now >= deadline[slot]:
                    why = f"the call did not return within timeout_s={self.timeout_s:g} s; worker restarted"
                    self._fail_first(slot, samples, pending[slot], tally, why=why, timed_out=True)
                    deadline[slot] = time.monotonic() + self.timeout_s
            pending = {slot: queue for slot, queue in pending.items() if queue}

    def _skip_rest(self, samples: list[tuple[str, str, str]], pending: dict[int, deque[int]], tally: _Tally) -> None:
        """The step's time budget is spent: the unanswered samples score 0.0 and are counted; the workers still
        on them are replaced (a fresh one imports its verifier while the trainer goes on)."""
        why = f"not scored: the call's time budget step_timeout_s={self.step_timeout_s:g} s ran out"
        for slot, queue in pending.items():
            for i in queue:
                tally.skip(i, why)
            queue.clear()
            self._live(slot).kill()
            self._workers[slot] = None
            try:
                self._workers[slot] = _Worker(self.verifier)
            except OSError:
                pass  # _send retries at the next step

    def _live(self, slot: int) -> _Worker:
        worker = self._workers[slot]
        assert worker is not None, "a slot with pending samples always has a worker"
        return worker

    def _fail_first(
        self, slot: int, samples: list[tuple[str, str, str]], queue: deque[int], tally: _Tally,
        *, why: str, timed_out: bool,
    ) -> None:
        """The sample a worker is stuck on (or died on) scores 0.0; a fresh worker takes the rest."""
        tally.record(queue.popleft(), 0.0, why, timed_out=timed_out)
        self._live(slot).kill()
        self._workers[slot] = None
        if queue:
            self._send(slot, samples, queue, tally)
        else:
            # Nothing left this step: start the replacement now and let it import its verifier while the
            # trainer works; the next step's _send waits for it to be ready.
            try:
                self._workers[slot] = _Worker(self.verifier)
            except OSError:
                pass  # _send retries at the next step

    def _send(self, slot: int, samples: list[tuple[str, str, str]], queue: deque[int], tally: _Tally) -> None:
        """Send the samples in `queue` to the worker of `slot` in one message, (re)starting the worker if
        needed. If no worker can be started they score 0.0 and `queue` is emptied; the next step retries."""
        batch = [(i, *samples[i]) for i in queue]
        failure = ""
        for _ in range(2):  # a worker that died between steps only shows when it is written to
            worker = self._workers[slot]
            try:
                if worker is None or not worker.alive():
                    if worker is not None:
                        worker.kill()
                    self._workers[slot] = None
                    worker = _Worker(self.verifier)
                    self._workers[slot] = worker
                if not worker.ready:
                    worker.wait_ready()
                worker.conn.send(batch)
                return
            except Exception as e:  # a failed restart must not stop the run; the samples score 0.0
                if worker is not None:
                    worker.kill()
                self._workers[slot] = None
                failure = f"cannot start a reward worker ({type(e).__name__}: {e})"
        for i in queue:
            tally.record(i, 0.0, failure, timed_out=False)
        queue.clear()


class _Tally:
    """Rewards and failure counts of one `score()` call."""

    def __init__(self, n: int, clip_range: tuple[float, float] | None = None) -> None:
        self.rewards = [0.0] * n
        self.errors = 0
        self.timeouts = 0
        self.skipped = 0
        self.clipped = 0
        self.clip_range = clip_range
        self.first_failure: str | None = None
        self.first_clipped: str | None = None

    def skip(self, i: int, why: str) -> None:
        self.rewards[i] = 0.0
        self.skipped += 1
        if self.first_failure is None:
            self.first_failure = f"sample {i}: {why}"

    def record(self, i: int, reward: float, error: str | None, *, timed_out: bool) -> None:
        self.rewards[i] = reward
        if error is None:
            if self.clip_range is not None and not self.clip_range[0] <= reward <= self.clip_range[1]:
                self.rewards[i] = min(max(reward, self.clip_range[0]), self.clip_range[1])
                self.clipped += 1
                if self.first_clipped is None:
                    self.first_clipped = f"sample {i}: {reward!r}"
            return
        self.rewards[i] = 0.0
        if timed_out:
            self.timeouts += 1
        else:
            self.errors += 1
        if self.first_failure is None:
            self.first_failure = f"sample {i}: {error}"


def _call_verifier(fn: Verifier, prompt: str, completion: str, answer: str) -> tuple[float, str | None]:
    """(reward, None) on success, (0.0, failure summary) otherwise."""
    try:
        value = fn(prompt, completion, answer)
    except Exception as e:  # any verifier bug costs one sample, never the run
        return 0.0, _summarize(e)
    if isinstance(value, (str, bytes)):  # float("1") would accept a string; a verifier returning one is a bug
        return 0.0, f"the verifier returned {_short(value)}; it must return a float"
    try:
        reward = float(value)
    except Exception:  # noqa: BLE001 - lists, None, complex, multi-element tensors, ...
        return 0.0, f"the verifier returned {_short(value)}; it must return a float"
    if not math.isfinite(reward):
        return 0.0, f"the verifier returned a non-finite reward ({reward}); it must return a finite float"
    return reward, None


def _short(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60] + '...' if len(text) > 60 else text})"


def _summarize(exc: BaseException) -> str:
    """`ValueError: bad input (at verifier.py:12 in check <- ...)`: the exception and its last frames."""
    # Frame 0 is _call_verifier itself; the user needs the verifier's frames.
    frames = traceback.extract_tb(exc.__traceback__)[1:][-_SUMMARY_FRAMES:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    what = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return f"{what} (at {where})" if where else what


# ------------------------------------------------------------------------------------ worker process


class _Worker:
    """One worker process and the parent's end of the socket pair it talks over."""

    def __init__(self, verifier: str) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # The same import path as the trainer, so the worker finds what the trainer finds ("" is the cwd).
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(child_sock.fileno()), str(os.getpid()), verifier],
                pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()  # the parent keeps only its end, so a dead worker reads as EOF
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        """True once the worker has reported that its verifier is imported."""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> None:
        """Block until the worker has imported its verifier; raise the worker's import error if it failed."""
        if not self.conn.poll(_STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError(
                f"reward worker did not start within {_STARTUP_TIMEOUT_S:g} s; check that importing the "
                f"verifier module is fast and does not block"
            )
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeError(
                f"reward worker exited during start-up (exit code {self.proc.wait()}); its stderr above says "
                f"why"
            ) from None
        if kind == "init_error":
            self.kill()
            exc_type, message = payload
            raise (ImportError if exc_type in ("ImportError", "ModuleNotFoundError") else ValueError)(message)
        self.ready = True

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _stop_workers(workers: list[_Worker | None]) -> None:
    """Ask each worker to exit, kill those that do not (a stuck call never reads the request)."""
    live = [w for w in workers if w is not None]
    for w in live:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + _CLOSE_TIMEOUT_S
    for w in live:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers[:] = [None] * len(workers)


# Ignore Ctrl-C and SIGTERM before anything else: they reach the whole process group (a terminal, a cluster
# scheduler stopping a job), and the trainer finishes its step and stops the workers itself; a worker killed
# first would cost that step's samples their rewards. Workers still end with their trainer (see _Worker).
_WORKER_CODE = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "import sys; "
    "from npo_engine.rewards.runner import _worker_main; "
    "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
)


def _worker_main(fd: int, parent_pid: int, verifier: str) -> None:
    """Worker loop: import the verifier, then score batches `[(i, prompt, completion, answer), ...]`,
    answering `(i, reward, error)` per sample; `None` ends the loop."""
    conn = Connection(fd)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        fn = resolve_verifier(verifier)
    except BaseException as e:  # report any import failure to the parent, which raises it in the trainer
        conn.send(("init_error", (type(e).__name__, str(e))))
        return
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for i, prompt, completion, answer in batch:
            reward, error = _call_verifier(fn, prompt, completion, answer)
            conn.send((i, reward, error))


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(_ORPHAN_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(1)
