"""Stopping a run on purpose: SIGTERM / SIGINT finish the current step, save and exit; a second signal exits at
once; too many consecutive non-finite steps stop the run.

    with GracefulStop(on_exit_now=release_lock) as stop:
        while ...:
            step()
            if stop.agreed():            # collective: every rank stops after the same step
                save(); raise TrainingStopped(stop.signum, ...)

How signals are seen: Python runs a signal handler only between bytecodes of the main thread, which may sit for
a long time inside one C call (a collective waiting for a slow rank, a large matmul). So the handler itself does
nothing; `signal.set_wakeup_fd` makes the C-level handler write each signal's number to a pipe at once, and a
watcher thread reads it: the first signal asks for a stop (and prints one line), and a second one calls
`os._exit(128 + signum)` right away, whatever the main thread is doing.

One signal can reach a process twice within moments: Ctrl-C under torchrun arrives from the terminal and again
from torchrun, which forwards it to its workers. A repeat within `_REPEAT_WINDOW_S` of the first therefore
counts as the same request. torchrun kills its workers `--shutdown_timeout` seconds (default 30) after
forwarding a signal, so set it above the time of one step plus one checkpoint save.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from npo_engine.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A second delivery of a signal this soon after the first is the same request arriving by a second path.
_REPEAT_WINDOW_S = 2.0


class TrainingStopped(UserError, RuntimeError):
    """The run stopped at a safe point because it received `signum`; `checkpoint` is what was saved (None when
    `checkpoint.every = 0`). `npo train` exits with 128 + signum, as a process killed by that signal would."""

    def __init__(self, message: str, signum: int = signal.SIGTERM, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    def __reduce__(self):
        return type(self), (str(self), self.signum, self.checkpoint)


class TrainingDiverged(UserError, RuntimeError):
    """The run stopped because its weights, loss or gradients stopped being finite (see `optim.max_bad_steps`)."""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class GracefulStop:
    """Context manager: while inside, SIGINT and SIGTERM set `signum` instead of killing the process.

    `on_exit_now` runs just before a second signal ends the process (e.g. to release the run directory's lock).
    Outside the main thread (where signal handlers cannot be installed) it does nothing.
    """

    def __init__(self, on_exit_now: Callable[[], None] | None = None, *, announce: bool = True) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._on_exit_now = on_exit_now
        self._announce = announce
        self._active = False

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _noop) for sig in _SIGNALS}
        self._active = True
        self._watcher = threading.Thread(target=self._watch, name="npo-signal-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        self._active = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns
        self._watcher.join(timeout=5)
        os.close(self._read_fd)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def agreed(self) -> int | None:
        """The signal to stop for if any rank received one, else None; collective (call it on every rank at the
        same point of the loop, so they all stop after the same step)."""
        from npo_engine.distributed import all_gather_objects

        received = [s for s in all_gather_objects(self.signum) if s is not None]
        return received[0] if received else None

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in _SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self._announce:
                print(f"npo train: {signal_name(signum)} received: stopping after the current step, with a "
                      "checkpoint; send it again to exit at once", file=sys.stderr, flush=True)
            return
        if now - self._first_at < _REPEAT_WINDOW_S:
            return
        print(f"npo train: second {signal_name(signum)}: exiting now, without saving", file=sys.stderr, flush=True)
        if self._on_exit_now is not None:
            try:
                self._on_exit_now()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(128 + signum)


def _noop(signum, frame) -> None:
    """Installed so that the C-level handler runs (and writes the wakeup fd); the watcher thread acts."""
