"""Full training state on disk: sharded DCP checkpoints for resume and rollback, and Hugging Face exports.

A checkpoint is a directory `root/step_{step:06d}/`:

```
step_000120/
  dcp/              model + optimizer state (torch.distributed.checkpoint: one file per rank + .metadata)
  rng_rank{r}.pt    rank r's RNG streams: python `random`, numpy, torch CPU, torch CUDA, named generators
  scheduler.pt      LR scheduler state_dict (rank 0; only when a scheduler was passed)
  extra.json        the caller's JSON-able trainer state: step, data position, controller state, ... (rank 0)
  COMPLETE          JSON manifest: step, world size, every file with its size and SHA-256. Written last.
```

Saving is a commit protocol, so a crash or a SIGKILL at any moment leaves the previous checkpoint loadable:

1. rank 0 removes leftovers of interrupted saves (`step_*.tmp`, `step_*.old`, `step_*.trash`); barrier.
2. every rank writes into `step_XXXXXX.tmp/` (the name derives from the step, so ranks agree without talking),
   fsyncing each file; barrier. The ranks then hash the files, each a share of them.
3. rank 0 writes `COMPLETE`, fsyncs the directory and `os.replace`s it to `step_XXXXXX/`: the atomic commit.
4. rank 0 applies retention (keep the newest `keep_last`, plus pinned steps); barrier.

Only directories named `step_<digits>` that hold `COMPLETE` count as checkpoints; anything else is ignored by
`list()`/`latest()` and cleared by the next save (or `clear_stale()`). `root` must be one filesystem that every
rank sees. A save that fails to write (a full disk, a quota) removes its `.tmp` directory on every rank's word
and raises `CheckpointWriteError` naming the directory, so nothing is left that fills the disk for the next
attempt; any other exception is a crash and leaves the `.tmp` for the next save to clear.

Loading checks every file against the manifest (size, then SHA-256; the ranks share the hashing) before any
state is touched, and raises `CheckpointError` naming the damaged file; `nonfinite_weights()` then tells a
caller whether the loaded weights are usable.

Trust: a checkpoint directory is code, not data. DCP reads `dcp/.metadata` with `pickle`, which can run
arbitrary code, so load only checkpoints written by you or a source you trust. The manifest hashes catch
damage (a bad disk, a truncated copy, an edited file), not an attacker who rewrites the manifest too. Share
models as the Hugging Face exports (`export_hf`: safetensors and JSON only), which are safe to load.

The model and optimizer go through `get_state_dict`/`set_state_dict`, which handle FSDP2 (DTensor) and plain
modules alike, so a checkpoint saved by N ranks loads on M ranks (DCP reshards). RNG streams do not reshard:
a rank without a saved stream is reseeded from (seed, rank), with a warning.

Runs under torchrun with a process group (gloo or NCCL) or as a single process with none.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from npo_engine.errors import UserError

# Bumped when the directory layout changes; load() refuses layouts it does not know. (The manifest's "sha256"
# map was added without a bump: older checkpoints have none and are checked by size only.)
_FORMAT_VERSION = 1
_COMPLETE = "COMPLETE"
_DCP_DIR = "dcp"
_EXTRA = "extra.json"
_SCHEDULER = "scheduler.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Leftovers of an interrupted save, replacement or deletion; never loadable, removed by the next save.
_STALE_DIR = re.compile(r"^step_\d+\.(tmp|old|trash)$")


_DAMAGED_SUFFIX = ".damaged"  # a checkpoint set aside by `set_aside`: kept for inspection, never loaded or cleared
_HASH_CHUNK = 1 << 20


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be loaded: incomplete, of an unknown format, or damaged (a file differs from the
    manifest)."""


class NoCheckpointError(UserError, FileNotFoundError):
    """There is no (intact) checkpoint to resume or restore from."""


class CheckpointWriteError(UserError, OSError):
    """A save could not write its files (disk full, quota, I/O error); the partial save was removed."""


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


class CheckpointManager:
    """Saves, lists, loads and prunes the checkpoints under `root`; one instance per rank.

    Args:
        root: directory of the checkpoints (`runs/<name>/checkpoints`); created on first save.
        keep_last: how many of the newest complete checkpoints retention keeps (pinned ones come on top).
        rank, world_size: this process's place in the job; must match the process group when one exists.
        pinned_steps: steps retention never deletes (e.g. an AutoNPO rollback target); see `pin()`.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int = 3,
        rank: int = 0,
        world_size: int = 1,
        pinned_steps: Iterable[int] = (),
    ) -> None:
        if keep_last < 1:
            raise ValueError(
                f"keep_last must be >= 1, got {keep_last}; the newest checkpoint is always kept."
            )
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank {rank} is outside world_size {world_size}; pass the torchrun RANK and WORLD_SIZE."
            )
        if _dist_on() and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"rank/world_size ({rank}, {world_size}) differ from the process group's "
                f"({dist.get_rank()}, {dist.get_world_size()}); "
                "pass dist.get_rank() and dist.get_world_size()."
            )
        if not _dist_on() and world_size > 1:
            raise ValueError(
                f"world_size is {world_size} but no process group is initialized; "
                "call torch.distributed.init_process_group() first, or pass world_size=1."
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.pinned_steps: set[int] = set(pinned_steps)

    # ---- naming and listing ------------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / _COMPLETE).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        found = self.list()
        return found[-1][1] if found else None

    def pin(self, step: int) -> None:
        """Exempt `step` from retention. Pins live in this object; keep them in `extra` across restarts."""
        self.pinned_steps.add(step)

    def unpin(self, step: int) -> None:
        self.pinned_steps.discard(step)

    def set_aside(self, path: Path) -> Path:
        """Rename a (damaged) checkpoint to `step_XXXXXX.damaged` so that nothing lists, loads or clears it; rank 0
        renames, every rank gets the new path (collective)."""
        target = path.with_name(path.name + _DAMAGED_SUFFIX)
        if self.rank == 0:
            suffix = 1
            while target.exists():
                target, suffix = path.with_name(f"{path.name}{_DAMAGED_SUFFIX}-{suffix}"), suffix + 1
            os.replace(path, target)
            _fsync_dir(self.root)
        _barrier()
        return Path(_broadcast(str(target)))

    def clear_stale(self) -> None:
        """Remove leftovers of interrupted saves now (the next save would), freeing their disk space; collective.
        Call it only while no other process saves into `root` (the run directory's lock guarantees that)."""
        if self.rank == 0 and self.root.is_dir():
            self._clear_stale()
        _barrier()

    # ---- save --------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
        generators: dict[str, torch.Generator] | None = None,
    ) -> Path:
        """Save the full training state of `step` atomically; collective (every rank calls it).

        Args:
            model: the policy, plain or FSDP2-sharded.
            optimizer: its optimizer (None saves the weights only).
            scheduler: an LR scheduler (anything with state_dict/load_state_dict); saved by rank 0.
            extra: JSON-able trainer state returned by `load()`; saved by rank 0.
            generators: named `torch.Generator`s whose states are saved with this rank's RNG streams.

        Returns the final checkpoint directory. Older checkpoints beyond `keep_last` (not pinned) are deleted
        once the new one is committed; saving a step that already has a checkpoint replaces it.

        An optimizer that has not stepped yet has no state to save; torch's `get_state_dict` creates it by
        taking one step with zero gradients and lr 0 (AdamW's step count becomes 1).
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}.")
        extra_json = _dumps_extra(extra or {})  # fails here, on every rank, before any collective
        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")

        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clear_stale()
        _barrier()

        failure = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            model_sd, optim_sd = _get_state(model, optimizer)
            state = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
            # FileSystemWriter fsyncs each file it writes (sync_files=True).
            with _quiet_single_process():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / _DCP_DIR), no_dist=not _dist_on())
            _write_durable(tmp / _rng_file(self.rank), _torch_bytes(_capture_rng(generators or {})))
            if self.rank == 0:
                _write_durable(tmp / _EXTRA, extra_json.encode())
                if scheduler is not None:
                    _write_durable(tmp / _SCHEDULER, _torch_bytes(scheduler.state_dict()))
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            failure = _write_failure(e)
            if failure is None:
                raise  # a crash, not a failed write: the .tmp stays for the next save to clear
        self._raise_if_any_failed(step, tmp, failure)  # every rank's files are on disk, or none is kept

        names = _broadcast(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                           if self.rank == 0 else None)
        digests = self._share_hashing(tmp, names)
        if self.rank == 0:
            self._commit(step, tmp, final, digests)
            self._apply_retention()
        _barrier()
        return final

    def _raise_if_any_failed(self, step: int, tmp: Path, failure: BaseException | None) -> None:
        """Collective: if any rank failed to write, remove the partial save and raise on every rank."""
        failures = [f for f in _all_gather(None if failure is None else _describe_write_failure(failure)) if f]
        if not failures:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        full = any(f["disk_full"] for f in failures)
        cause = ("the disk is full" if full else "a write failed") + f" ({failures[0]['what']})"
        raise CheckpointWriteError(
            f"cannot save the checkpoint of step {step} into {self.root}: {cause}; {free / 2**30:.2f} GiB are free "
            f"there. The partial save was removed and the previous checkpoints are intact; free space (e.g. "
            f"lower checkpoint.keep_last) or move the run directory to a larger disk, then --resume.")

    def _share_hashing(self, directory: Path, names: list[str]) -> dict[str, str]:
        """SHA-256 of `directory/name` for every name, each rank hashing every world_size-th file (collective)."""
        digests: dict[str, str] = {}
        for part in _all_gather({name: _sha256(directory / name) for name in names[self.rank :: self.world_size]}):
            digests |= part
        return digests

    def _commit(self, step: int, tmp: Path, final: Path, digests: dict[str, str] | None = None) -> None:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format_version": _FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "time": time.time(),
            "torch": torch.__version__,
            "files": files,
            "sha256": digests or {},
        }
        _write_durable(tmp / _COMPLETE, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp / _DCP_DIR)
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. replaying after a rollback): move the old one aside first, because
            # os.replace cannot overwrite a non-empty directory. A crash in between leaves `.old`, which is
            # cleared by the next save; the checkpoints of other steps stay loadable throughout.
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            _fsync_dir(self.root)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
            _fsync_dir(self.root)

    def discard_after(self, step: int) -> None:
        """Delete every checkpoint of a step after `step` (a rollback discards that segment); collective.

        Without this, retention (which keeps the highest steps) would delete the replay's checkpoints as soon
        as they were written, and `--resume` would pick the discarded segment."""
        if self.rank == 0:
            for saved, path in self.list():
                if saved > step:
                    trash = path.with_name(path.name + ".trash")
                    os.replace(path, trash)
                    shutil.rmtree(trash)
                    self.pinned_steps.discard(saved)
            if self.root.is_dir():
                _fsync_dir(self.root)
        _barrier()

    def _apply_retention(self) -> None:
        complete = self.list()
        keep = {step for step, _ in complete[-self.keep_last :]} | self.pinned_steps
        for step, path in complete:
            if step not in keep:
                # Rename first so a deletion cut short never looks like a complete checkpoint.
                trash = path.with_name(path.name + ".trash")
                os.replace(path, trash)
                shutil.rmtree(trash)
        _fsync_dir(self.root)

    def _clear_stale(self) -> None:
        for entry in self.root.iterdir():
            if not _STALE_DIR.match(entry.name):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ---- load --------------------------------------------------------------------------------------------

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        scheduler: Any | None = None,
        generators: dict[str, torch.Generator] | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Restore a checkpoint into `model`, `optimizer`, `scheduler` and this rank's RNG; collective.

        Args:
            path: a checkpoint directory (from `latest()`, `list()` or `path_for()`).
            optimizer: None loads the weights only (e.g. a guide engine).
            generators: named generators to restore; each must have been saved under the same name.
            seed: the run's seed; used only to reseed ranks that have no saved RNG stream (world size grew).

        Returns the `extra` dict given to `save()`.
        """
        path = Path(path)
        manifest = self.verify(path)

        model_sd, optim_sd = _get_state(model, optimizer)
        state = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path / _DCP_DIR), no_dist=not _dist_on())
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

        if scheduler is not None:
            if not (path / _SCHEDULER).is_file():
                raise ValueError(
                    f"{path} holds no scheduler state; it was saved without one. Pass scheduler=None."
                )
            scheduler.load_state_dict(torch.load(path / _SCHEDULER, weights_only=True))

        generators = generators or {}
        saved_world = manifest["world_size"]
        rng_path = path / _rng_file(self.rank)
        if saved_world != self.world_size:
            warnings.warn(
                f"{path} was saved by {saved_world} ranks and is loaded by {self.world_size}: model and "
                "optimizer are resharded, but RNG streams are not, so sampling will not continue bitwise.",
                RuntimeWarning,
                stacklevel=2,
            )
        if rng_path.is_file():
            _restore_rng(torch.load(rng_path, weights_only=True), generators)
        else:
            warnings.warn(
                f"{path} has no RNG state for rank {self.rank}; "
                f"reseeding it from (seed={seed}, rank={self.rank}).",
                RuntimeWarning,
                stacklevel=2,
            )
            _reseed(seed, self.rank, generators)

        return json.loads((path / _EXTRA).read_text())

    def verify(self, path: Path) -> dict[str, Any]:
        """Check that `path` is a complete checkpoint whose files match its manifest (sizes, then SHA-256 shared
        over the ranks); returns the manifest or raises `CheckpointError` on every rank (collective)."""
        path = Path(path)
        problem, manifest = None, {}
        try:
            manifest = _read_manifest(path)
        except CheckpointError as e:
            problem = e
        expected = manifest.get("sha256", {})
        names = sorted(expected)
        mismatched = [name for name in names[self.rank :: self.world_size]
                      if _sha256(path / name) != expected[name]]
        gathered = _all_gather((None if problem is None else str(problem), mismatched))
        if problem is not None:
            raise problem
        problems = [p for p, _ in gathered if p]
        if problems:
            raise CheckpointError(problems[0])
        bad = sorted(name for _, part in gathered for name in part)
        if bad:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {', '.join(bad)} does not match the SHA-256 in its manifest; "
                "use an earlier checkpoint (--resume falls back to the newest intact one)")
        return manifest

    # ---- Hugging Face export -----------------------------------------------------------------------------

    def export_hf(
        self,
        step: int,
        model: torch.nn.Module,
        out_dir: Path,
        *,
        tokenizer: Any | None = None,
        config: Any | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write the policy's full weights as a Hugging Face model directory; collective (all ranks gather).

        `out_dir` gets `model.safetensors` (metadata `step`), `config.json` and, when given, the tokenizer
        files; it loads with `AutoModelForCausalLM.from_pretrained(out_dir)`. Rank 0 writes into
        `out_dir.tmp` and renames it into place, replacing an existing export.

        Args:
            config: a transformers `PretrainedConfig`; defaults to `model.config`.
            dtype: cast floating-point weights (and `config.dtype`) to it, e.g. torch.bfloat16 for vLLM.
        """
        config = config if config is not None else getattr(model, "config", None)
        if config is None:
            raise ValueError(
                f"{type(model).__name__} has no .config; pass config= (a transformers PretrainedConfig)."
            )
        # Every rank takes part in the gather; with cpu_offload only rank 0 receives the tensors.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out_dir = Path(out_dir)
        if self.rank == 0:
            _write_hf_dir(step, full, out_dir, tokenizer=tokenizer, config=config, dtype=dtype)
        _barrier()
        return out_dir


# ---- helpers: process group, files ---------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Messages of writers that fail without an OSError: torch's zip writer reports a short write (a full disk) as
# "unexpected pos"; others name the errno in their text.
_WRITE_FAILURE_TEXT = ("unexpected pos", "No space left", "Disk quota exceeded", "file write failed")


def _write_failure(exc: BaseException) -> BaseException | None:
    """The failed write inside `exc` (itself, a cause, or one rank's failure in DCP's CheckpointException), or
    None when `exc` is something else (a crash, a bug)."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) or any(text in str(e) for text in _WRITE_FAILURE_TEXT):
            if not isinstance(e, (KeyboardInterrupt, SystemExit)):
                return e
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def _describe_write_failure(exc: BaseException) -> dict[str, Any]:
    text = " ".join(str(exc).split())
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        t in text for t in ("unexpected pos", "No space left", "Disk quota exceeded"))
    return {"what": f"{type(exc).__name__}: {text[:200]}", "disk_full": full}


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity on any rank (collective; [] when all are finite).

    One pass over this rank's shards and one small all-reduce; the names make the error actionable."""
    names, flags = [], []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard
        names.append(name)
        flags.append(torch.isfinite(local.detach()).all() if local.numel() else
                     torch.ones((), dtype=torch.bool, device=local.device))
    if not flags:
        return []
    bad = (~torch.stack(flags)).to(torch.float32)
    if _dist_on():
        dist.all_reduce(bad)
    return [name for name, b in zip(names, bad.tolist()) if b > 0]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning, on each save/load without a process group, that it assumes one process."""
    with warnings.catch_warnings():
        if not _dist_on():
            warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def _get_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def _dumps_extra(extra: dict[str, Any]) -> str:
    try:
        return json.dumps(extra, indent=1)
    except TypeError as err:
        raise TypeError(
            f"checkpoint extra must be JSON-able ({err}); convert tensors with .item()/.tolist() "
            "and pass generators through generators=."
        ) from err


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new files, renames); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NotComplete(CheckpointError, FileNotFoundError):
    """No COMPLETE marker: an interrupted save, or not a checkpoint."""


def _read_manifest(path: Path) -> dict[str, Any]:
    marker = path / _COMPLETE
    if not marker.is_file():
        raise _NotComplete(
            f"{path} is not a complete checkpoint (no {_COMPLETE} marker); use CheckpointManager.latest() "
            "or list() to find complete ones."
        )
    try:
        manifest = json.loads(marker.read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is damaged: its {_COMPLETE} manifest is not JSON ({e}).") from e
    if manifest.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')}, "
            f"this code reads {_FORMAT_VERSION}."
        )
    for name, size in manifest["files"].items():
        found = path / name
        if not found.is_file() or found.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing or not {size} bytes.")
    return manifest


# ---- helpers: RNG --------------------------------------------------------------------------------------


def _capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This process's RNG streams as tensors and plain values, readable by `torch.load(weights_only=True)`."""
    py_version, py_mt, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "mt": torch.tensor(py_mt, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()  # the current device: one device per rank
    return state


def _restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    for name, generator in generators.items():
        if name not in state["generators"]:
            raise KeyError(
                f"generator {name!r} was not saved in this checkpoint "
                f"(saved: {sorted(state['generators'])}); "
                "pass the same generators= names to save() and load()."
            )
        generator.set_state(state["generators"][name])


def _derived_seed(seed: int, rank: int, name: str = "") -> int:
    digest = hashlib.sha256(f"{seed}/{rank}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _reseed(seed: int, rank: int, generators: dict[str, torch.Generator]) -> None:
    derived = _derived_seed(seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # also seeds every CUDA device
    for name, generator in generators.items():
        generator.manual_seed(_derived_seed(seed, rank, name))


# ---- helpers: Hugging Face directory -------------------------------------------------------------------


def _write_hf_dir(
    step: int,
    full: dict[str, torch.Tensor],
    out_dir: Path,
    *,
    tokenizer: Any | None,
    config: Any,
    dtype: torch.dtype | None,
) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in full.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().contiguous()
    if getattr(config, "tie_word_embeddings", False):
        # safetensors refuses two names for one storage; transformers re-ties lm_head to the embedding.
        tensors.pop("lm_head.weight", None)
    config = copy.deepcopy(config)
    if dtype is not None:
        config.dtype = dtype

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)

    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
