"""GracefulStop in a child process: the first SIGTERM only asks for a stop, a repeat within the window counts as
the same request, and a later one exits at once even while the main thread is blocked in a system call.
(The trainer's use of it, a checkpoint at the next safe point, is tested in tests/integration/test_run_safety.py.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

_CHILD = """
import os
from npo_engine.stopping import GracefulStop
with GracefulStop() as stop:
    print("ready", flush=True)
    os.read(os.pipe()[0], 1)  # blocks forever: no safe point is ever reached
"""


def test_second_signal_exits_at_once_even_when_the_main_thread_is_blocked():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert "SIGTERM received: stopping after the current step" in child.stderr.readline()
        child.send_signal(signal.SIGTERM)  # the same request arriving twice (e.g. terminal and torchrun)
        time.sleep(0.5)
        assert child.poll() is None
        time.sleep(2.0)  # past the repeat window
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - sent < 5
        assert "second SIGTERM: exiting now" in child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
