"""The run directory's owner and its history: an exclusive lock, the rules for a new run, `--resume` and
`--overwrite`, and the config the run was started with.

    runs/<name>/.lock          JSON {"pid", "host", "started", "proc_start"}: the process that owns the run
    runs/<name>/config.yaml    the resolved config, written once the run has really started or resumed

The rules, applied by rank 0 (the other ranks receive its verdict, so every rank raises the same error):

- **One owner.** `.lock` is created exclusively (written to a temporary, then `os.link`ed into place, which fails
  when the name exists, like O_EXCL, and never shows a half-written lock). A lock whose owner is alive is refused
  with its pid, host and start time. A lock whose pid is dead on this host (or was reused by a later process:
  the kernel's start time differs) is taken over; the takeover itself runs under a second exclusive file,
  `.lock.takeover`, so two processes cannot both take over the same stale lock. A lock held on another host is
  never taken over: this host cannot tell whether that process lives.
- **A new run needs an empty directory.** A directory that holds anything besides the lock is refused, naming
  `--resume`, another `--run-dir`, or `--overwrite`, which moves the old run's files to
  `<run_dir>.old-<timestamp>/`; nothing is ever deleted.
- **`--resume` continues the run it finds.** The stored `config.yaml` is compared with the new config: the
  fields of `RESUMABLE_FIELDS` may change (the trainer records them as a `config_changed` event); any other
  difference is refused with the fields listed. `config.yaml` is rewritten only after the resume succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npo_engine.config import ConfigError, TrainConfig, config_to_dict, dump_config, load_config
from npo_engine.errors import UserError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
_TAKEOVER_FILE = ".lock.takeover"
# A takeover holds its guard file for a few file operations; one older than this was left by a process that died
# during its takeover, and may be removed.
_TAKEOVER_STALE_S = 30.0
# How long a process waits for another one's takeover to finish before giving up.
_TAKEOVER_WAIT_S = 10.0

RESUMABLE_FIELDS = (
    "run.steps", "run.name", "run.runs_dir", "run.cpu_threads", "logging.*",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.export_steps", "checkpoint.export_final",
    "reward.num_workers", "reward.timeout_s", "reward.step_timeout_s", "optim.max_bad_steps",
)
"""Config fields that `--resume` may change: how long to train, where and how often to log, checkpoint and
export, and how rewards are computed in time (not what they are). Every other field defines the run."""


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked (locked by another process, or holds another run)."""


# ------------------------------------------------------------------------------------------------------ the lock


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # fields after "(comm)" start at field 3


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False  # the pid was reused by a process started later
    return True


class RunLock:
    """Exclusive ownership of a run directory by this process (see the module docstring).

    `acquire()` raises `RunDirError` naming the owner when the directory is taken; `release()` removes the lock
    if it is still this process's. The lock is also released when the object is garbage collected and at
    interpreter exit; after a SIGKILL the next run takes it over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "proc_start": _proc_start(os.getpid())}
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _TAKEOVER_WAIT_S
        text = json.dumps(self.info)
        while True:
            if self._create(text):
                self._finalizer = weakref.finalize(self, _release, self.path, text)
                return
            owner = _read_lock(self.path)
            if owner is None:
                continue  # released between our attempt and the read: try again
            if owner.get("host") != self.info["host"] or _pid_alive(int(owner["pid"]), owner.get("proc_start")):
                raise RunDirError(_locked_message(self.path, owner, self.info))
            if not self._take_over(owner) and time.monotonic() > deadline:
                raise RunDirError(f"{self.path} is being taken over by another process; try again, or delete the "
                                  f"file if no other process is starting on {self.path.parent}")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def _create(self, text: str) -> bool:
        """Put our lock in place atomically with its content; False when a lock exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Remove `stale` (a dead owner's lock) if it is still the lock; False if another takeover is running."""
        guard = self.path.with_name(_TAKEOVER_FILE)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                    guard.unlink()  # its taker died in the middle
            time.sleep(0.05)
            return False
        try:
            if _read_lock(self.path) == stale:
                self.path.unlink()
            return True
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": "?", "started": "?", "unreadable": True}


def _release(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        if path.read_text() == text:  # never remove a lock another process took over from us
            path.unlink()


def _locked_message(path: Path, owner: dict[str, Any], me: dict[str, Any]) -> str:
    if owner.get("unreadable"):
        return (f"run directory {path.parent} is locked by an unreadable {path}; if no run uses this directory, "
                f"delete {path}")
    who = f"pid {owner['pid']} on host {owner['host']} (started {owner.get('started', '?')})"
    if owner.get("host") != me["host"]:
        fix = f"if that process has ended, delete {path}"
    elif int(owner["pid"]) == me["pid"]:
        fix = "this process already has a Trainer on it: close() that one first"
    else:
        fix = "wait for it to finish or stop it, or use another --run-dir"
    return f"run directory {path.parent} is in use by {who}; {fix}"


# ------------------------------------------------------------------------------------ new run, resume, overwrite


@dataclass
class RunDir:
    """What opening a run directory found: where the old run went (`--overwrite`), and the allowed config changes
    of a `--resume` as {field: (stored, new)}. Holds the lock on rank 0 (None on the other ranks)."""

    path: Path
    lock: RunLock | None = None
    moved_to: Path | None = None
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def write_config(self, cfg: TrainConfig) -> None:
        """Write `config.yaml` (rank 0): the run has started or resumed with `cfg`."""
        if self.lock is None:
            return
        tmp = self.path / f"{CONFIG_FILE}.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, self.path / CONFIG_FILE)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run_dir(path: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool, is_main: bool) -> RunDir:
    """Take ownership of `path` for a new run (`resume=False`) or a resumed one; collective under torchrun.

    Rank 0 takes the lock and applies the rules of the module docstring; the other ranks get its verdict, so a
    refusal raises the same error on every rank. Raises `RunDirError` or `ConfigError` (a refused config change).
    """
    from npo_engine.distributed import broadcast_object  # torch: imported only where a job is set up

    path = Path(path)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the run directory and --overwrite moves it aside; "
                          "pass one of them")
    run, error = RunDir(path), None
    if is_main:
        try:
            run = _open(path, cfg, resume=resume, overwrite=overwrite)
        except Exception as e:  # every rank must learn of it, or the others would wait in the next collective
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error
    moved_to, changes = broadcast_object((run.moved_to, run.config_changes))
    return run if is_main else RunDir(path, moved_to=moved_to, config_changes=changes)


def _open(path: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> RunDir:
    lock = RunLock(path)
    lock.acquire()
    try:
        run = RunDir(path, lock=lock)
        if resume:
            run.config_changes = resume_changes(path, cfg)
        else:
            run.moved_to = _claim_for_new_run(path, overwrite)
        return run
    except BaseException:
        lock.release()
        raise


def _claim_for_new_run(path: Path, overwrite: bool) -> Path | None:
    """Nothing to do for an empty directory; the old run's files moved aside with `overwrite`; else an error."""
    entries = sorted(e for e in path.iterdir() if e.name not in (LOCK_FILE, _TAKEOVER_FILE)
                     and not e.name.startswith(LOCK_FILE + "."))
    if not entries:
        return None
    if not overwrite:
        shown = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(
            f"run directory {path} already holds a run ({shown}); continue it with --resume, start the new run "
            f"in another --run-dir (or run.name), or pass --overwrite to move the old run to "
            f"{path.name}.old-<timestamp>")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.old-{stamp}")
    suffix = 1
    while aside.exists():
        aside, suffix = path.with_name(f"{path.name}.old-{stamp}-{suffix}"), suffix + 1
    aside.mkdir()
    for entry in entries:  # entry by entry, so the lock stays in place and owned throughout
        os.replace(entry, aside / entry.name)
    return aside


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _resumable(key: str) -> bool:
    section = key.split(".")[0] + ".*"
    return key in RESUMABLE_FIELDS or section in RESUMABLE_FIELDS


def resume_changes(path: Path, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The differences between `path/config.yaml` and `cfg` as {field: (stored, new)}, all of them resumable;
    `ConfigError` listing the others if there are any. A directory without config.yaml gives {} (nothing to
    compare: either nothing to resume, which the checkpoint lookup reports, or a run not written by npo train)."""
    stored_path = Path(path) / CONFIG_FILE
    if not stored_path.is_file():
        return {}
    try:
        stored = load_config(stored_path)
    except ConfigError as e:
        raise ConfigError(f"--resume: the run's stored config {stored_path} does not load with this engine ({e}); "
                          "resume with the engine version that started the run") from e
    old, new = _flat(config_to_dict(stored)), _flat(config_to_dict(cfg))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)}
    refused = {key: change for key, change in changed.items() if not _resumable(key)}
    if refused:
        listed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in refused.items())
        raise ConfigError(
            f"--resume continues the run in {path} with the config it was started with, and these fields differ "
            f"from {stored_path}: {listed}. Drop those overrides to resume, or start a new run (another "
            f"--run-dir, or --overwrite) to change them. Fields that may change on resume: "
            f"{', '.join(RESUMABLE_FIELDS)}")
    return changed
