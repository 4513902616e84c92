"""The run directory's lock and rules, without a trainer: a live owner is refused by pid and host, a dead one is
taken over (by exactly one of several racing processes), a new run needs an empty directory or --overwrite,
and --resume accepts only the resumable config fields.

These run in well under a second each, apart from the racing processes (a few seconds of interpreter start-up).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npo_engine.config import ConfigError, dump_config, load_config
from npo_engine.run_dir import LOCK_FILE, RunDirError, RunLock, open_run_dir, resume_changes

_HOLD = """
import sys, time
from pathlib import Path
from npo_engine.run_dir import RunLock, RunDirError
lock = RunLock(Path(sys.argv[1]))
try:
    lock.acquire()
except RunDirError:
    print("refused", flush=True)
    sys.exit(3)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(run_dir: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_owner_is_refused_with_pid_and_host_and_a_dead_one_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirError, match="this process already has a Trainer on it"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_reused_pid_and_other_hosts(tmp_path):
    """A lock naming a live pid whose process started at another time (a reused pid) is stale; a lock of
    another host is never taken over, since this host cannot see that process."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                  "started": "earlier", "proc_start": "1"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "earlier"}))
    with pytest.raises(RunDirError, match=f"node-17.*if that process has ended, delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path).acquire()


def test_racing_takeovers_of_a_stale_lock_leave_one_owner(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": "earlier"}))
    # The winner holds the lock until it is killed, however late the slowest racer starts.
    racers = [subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "300"], stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    outcomes = sorted(r.stdout.readline().strip() for r in racers)
    for r in racers:
        r.kill()
        r.wait()
    assert outcomes == ["held", "refused", "refused", "refused"]


def test_new_run_needs_an_empty_directory_and_overwrite_moves_the_old_run_aside(tmp_path):
    cfg = load_config()
    run_dir = tmp_path / "run"
    fresh = open_run_dir(run_dir, cfg, resume=False, overwrite=False, is_main=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints").mkdir()
    fresh.release()

    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--run-dir.*--overwrite"):
        open_run_dir(run_dir, cfg, resume=False, overwrite=False, is_main=True)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (run_dir / LOCK_FILE).exists()  # a refusal gives the directory back

    moved = open_run_dir(run_dir, cfg, resume=False, overwrite=True, is_main=True)
    assert moved.moved_to.name.startswith("run.old-")
    assert sorted(p.name for p in moved.moved_to.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    moved.release()
    with pytest.raises(RunDirError, match="pass one of them"):
        open_run_dir(run_dir, cfg, resume=True, overwrite=True, is_main=True)


def test_resume_allows_only_resumable_fields(tmp_path):
    stored = load_config(None, ["run.steps=10", "optim.lr=1e-3"])
    (tmp_path / "config.yaml").write_text(dump_config(stored))
    assert resume_changes(tmp_path, stored) == {}
    longer = load_config(None, ["run.steps=20", "optim.lr=1e-3", "logging.eval_every=5", "checkpoint.every=5"])
    assert resume_changes(tmp_path, longer) == {"checkpoint.every": (50, 5), "logging.eval_every": (25, 5),
                                                "run.steps": (10, 20)}
    changed = load_config(None, ["run.steps=20", "optim.lr=2e-3", "rollout.temperature=0.7"])
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.002; rollout\.temperature: 1\.0 -> 0\.7") as e:
        resume_changes(tmp_path, changed)
    assert "run.steps" not in str(e.value).split("Fields that may change")[0]
    assert resume_changes(tmp_path / "elsewhere", changed) == {}  # no stored config: nothing to compare


def test_lock_is_released_when_its_owner_is_collected(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    del lock
    deadline = time.monotonic() + 5
    while (tmp_path / LOCK_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / LOCK_FILE).exists()
